//! Facts about the machine a benchmark runs on, and the Python it compares against.

use std::process::Command;

/// The Python with the given modules importable: `$BENCH_PYTHON`, else the project's venv.
pub fn python(modules: &str) -> Option<String> {
    let py = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "/work/pyenv/venv/bin/python".into());
    let ok = Command::new(&py).args(["-c", &format!("import {modules}")]).output().is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// CPU model, core count, widest SIMD and RAM, for the header of a results table.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let simd = if cpuinfo.contains(" avx512f") {
        "AVX-512"
    } else if cpuinfo.contains(" avx2") {
        "AVX2"
    } else {
        "no AVX2"
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {simd}, {:.0} GiB RAM", mem_kib as f64 / (1 << 20) as f64)
}

/// The 1, 5 and 15 minute load averages.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
