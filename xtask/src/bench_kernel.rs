//! `cargo xtask bench kernel`: the matrix product of the runtime's panel-major weights, one thread, by
//! `gemm` (one call per 64-column panel, what the runtime did before) and by our own AVX-512 panel kernel
//! (`crates/model/src/panel_avx512.rs`, what it does now where the CPU has AVX-512F), on SmolLM2-135M's
//! shapes (hidden 576, MLP 1536, vocabulary 49152) at the row counts of a generation step (1-64 prompts)
//! and of a prompt pass (512, 2048 tokens). Each speed is the best of 3 rounds of at least 0.2 s.
//! Prints a Markdown table for docs/benchmarks.md.

use anyhow::{Result, bail};

use crate::host;

pub fn run(args: &[&str]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask bench kernel");
    }
    let shapes = [
        (576, 960, "attention q/k/v (576 -> 960)"),
        (576, 3072, "MLP gate/up (576 -> 3072)"),
        (1536, 576, "MLP down (1536 -> 576)"),
        (576, 49152, "LM head (576 -> 49152)"),
    ];
    let rows = [1, 8, 32, 64, 512, 2048];
    println!("Machine: {}; load: {}\n", host::machine(), host::load());
    println!("| product | rows | `gemm` GFLOP/s | own kernel GFLOP/s | ratio |");
    println!("|---|---|---|---|---|");
    for (k, n, what) in shapes {
        for m in rows {
            let (gemm, own) = model::panel_kernel_speeds(m, k, n);
            match own {
                Some(own) => println!("| {what} | {m} | {gemm:.1} | {own:.1} | {:.2}x |", own / gemm),
                None => println!("| {what} | {m} | {gemm:.1} | (no AVX-512F) | |"),
            }
        }
    }
    Ok(())
}
