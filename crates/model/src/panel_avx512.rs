//! The product of rows with one weight panel on AVX-512, our own microkernel (where the CPU lacks
//! AVX-512F, `gemm` runs instead). Measured single-threaded on this machine's Zen 4 against the `gemm`
//! call it replaces, on SmolLM2's shapes (docs/benchmarks.md, "Own AVX-512 panel kernel"): 1 row 3-4x
//! faster (gemm re-packs the rows for every panel), 64 rows 10-25%, and prompt-sized products of 512-2048
//! rows equal or faster.
//!
//! More important than speed is what it computes: a block of up to [`R`] rows times the whole 64-column
//! panel lives in 4R registers; each step of the inner dimension loads one row of the panel (4 vectors)
//! and adds it, times each row's input value, with one fused multiply-add per vector. Every output value
//! is therefore one chain of fused multiply-adds over the inner dimension in order, from 0: the same bits
//! for any number of rows, any block a row falls in, any thread count, and any width the weights are held
//! at (a chunked panel continues the chain from the stored value). `gemm`'s sums depend on how many rows
//! it is given, so with it a generation step and the prompt pass computed the same token's logits with
//! different roundings; with this kernel they agree bit for bit (`tests/prefix.rs`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::kernels::PANEL;

/// Rows per register block: 4 accumulators each, 24 of the 32 vector registers, 4 more for the panel row.
const R: usize = 6;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[:, cols] (+)= x[:, c0..c0+kc] · chunk` for the `m` rows of `x` (row stride `k`), where `chunk` is
/// rows `c0..c0+kc` of one panel (`kc * PANEL` values, row stride `PANEL`) and `y` points to the first of
/// the panel's `width` columns of the `m` rows of the output (row stride `n`). The first chunk (`c0 == 0`)
/// assigns, later ones add to the stored values.
///
/// # Safety
/// The CPU has AVX-512F ([`available`]); `x` holds `m * k` values with `c0 + kc <= k`; `y` is valid for
/// `m` rows of `width <= PANEL` values at stride `n`, and nothing else accesses them during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(x: &[f32], m: usize, k: usize, c0: usize, chunk: &[f32], y: *mut f32, n: usize, width: usize) {
    let kc = chunk.len() / PANEL;
    debug_assert!(c0 + kc <= k && x.len() >= m * k && width <= PANEL);
    let masks: [__mmask16; 4] = std::array::from_fn(|j| {
        let valid = width.saturating_sub(16 * j).min(16);
        ((1u32 << valid) - 1) as __mmask16
    });
    let mut r = 0;
    while r < m {
        let rows = (m - r).min(R);
        // SAFETY: rows r..r+rows of `x` (from column c0) and of `y` are inside the caller's bounds.
        unsafe {
            let (xr, yr) = (x.as_ptr().add(r * k + c0), y.add(r * n));
            let a = c0 > 0;
            match rows {
                6 => block::<6>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
                5 => block::<5>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
                4 => block::<4>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
                3 => block::<3>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
                2 => block::<2>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
                _ => block::<1>(xr, k, kc, chunk.as_ptr(), yr, n, &masks, a),
            }
        }
        r += rows;
    }
}

/// `B` rows: `x` (row stride `k`) from the chunk's first column, `w` the chunk, `y` (row stride `n`) the
/// block's first output; `masks` select the valid columns of each of the 4 vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn block<const B: usize>(
    x: *const f32,
    k: usize,
    kc: usize,
    w: *const f32,
    y: *mut f32,
    n: usize,
    masks: &[__mmask16; 4],
    accumulate: bool,
) {
    // SAFETY (whole body): the caller's bounds; masked loads and stores touch only the valid columns (the
    // addresses of masked-off vectors may lie past the end: they are computed, never accessed).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; B];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(masks[j], y.wrapping_add(i * n + 16 * j));
                }
            }
        }
        for c in 0..kc {
            let p = w.add(c * PANEL);
            let wv = [
                _mm512_loadu_ps(p),
                _mm512_loadu_ps(p.add(16)),
                _mm512_loadu_ps(p.add(32)),
                _mm512_loadu_ps(p.add(48)),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i * k + c));
                for (v, wj) in row.iter_mut().zip(wv) {
                    *v = _mm512_fmadd_ps(xv, wj, *v);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(y.wrapping_add(i * n + 16 * j), masks[j], *v);
            }
        }
    }
}
