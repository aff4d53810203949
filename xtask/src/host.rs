//! Facts about the machine a benchmark runs on, and the Python it compares against.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

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

/// One timed run.
pub struct Timed {
    pub wall: f64,
    /// User + system CPU seconds of the command and its children.
    pub cpu: f64,
    /// Peak resident set size, kB.
    pub rss: u64,
    /// The command's stdout.
    pub stdout: String,
}

/// Runs `sh -c SCRIPT` under /usr/bin/time -v.
pub fn timed(script: &str) -> Result<Timed> {
    let started = Instant::now();
    let out =
        Command::new("/usr/bin/time").args(["-v", "sh", "-c", script]).output().context("running /usr/bin/time")?;
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("`{script}` failed: {stderr}");
    }
    let field = |name: &str| -> Result<f64> {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no `{name}` in /usr/bin/time -v output"))
    };
    let cpu = field("User time (seconds): ")? + field("System time (seconds): ")?;
    let rss = field("Maximum resident set size (kbytes): ")? as u64;
    Ok(Timed { wall: secs, cpu, rss, stdout: String::from_utf8_lossy(&out.stdout).into_owned() })
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Builds the release `abliterate` of the workspace at `root` and returns its path.
pub fn release_abliterate(root: &std::path::Path) -> Result<std::path::PathBuf> {
    let status =
        Command::new(env!("CARGO")).args(["build", "--release", "-p", "abliterate"]).current_dir(root).status()?;
    if !status.success() {
        bail!("cargo build --release -p abliterate failed");
    }
    Ok(root.join("target/release/abliterate").canonicalize()?)
}

/// The refusing test model: `given`, else built by `../shared/models/build-smollm2-refusal.sh` (cached under
/// `target/test-models/`).
pub fn refusing_model(root: &std::path::Path, given: Option<std::path::PathBuf>) -> Result<std::path::PathBuf> {
    if let Some(m) = given {
        return Ok(m);
    }
    let m = root.join("target/test-models/smollm2-135m-refusal");
    let script = root.join("../shared/models/build-smollm2-refusal.sh");
    if !Command::new("bash").arg(&script).arg(&m).status()?.success() {
        bail!("`{}` failed", script.display());
    }
    Ok(m)
}
