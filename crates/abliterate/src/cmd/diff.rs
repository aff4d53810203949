//! `abliterate diff A B [--direction FILE] [--json] [--expect-orthogonal TOL]`: what differs
//! between two checkpoints, tensor by tensor (the `diff` crate measures; this file prints), and
//! with `--expect-orthogonal` a gate for CI: exit 1 when a residual writer of B still writes the
//! direction.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use checkpoint::Checkpoint;
use diff::{Change, Gate, KindSummary, Options, Report, Status, TensorDiff, sketch};
use direction::Direction;
use serde_json::{Map, Value, json};

use crate::progress;

#[derive(clap::Args)]
pub struct Args {
    /// The first model directory (e.g. the original).
    a: PathBuf,
    /// The second model directory (e.g. the edited copy).
    b: PathBuf,
    /// Direction file: measure every residual writer against it (alignment of its change, and what
    /// B still writes along it; Gemma 2/3 post-norm writers against their layer's ŝ).
    #[arg(long, value_name = "FILE")]
    direction: Option<PathBuf>,
    /// Gate: exit 1 if any residual writer of B keeps |d̂ᵀW| / |W|_F above TOL (d̂ = r̂, or ŝ for
    /// Gemma 2/3 post-norm writers), naming them. An unedited writer is near 1/sqrt(hidden_size); an
    /// exact edit stored in bf16 keeps only rounding, near 2e-3/sqrt(hidden_size).
    #[arg(long, value_name = "TOL", requires = "direction")]
    expect_orthogonal: Option<f64>,
    /// Without a direction: find whether B is A with a few directions removed from its residual-stream
    /// writers (an abliteration, any variant), which, where, and how much of the change they explain.
    #[arg(long, conflicts_with_all = ["direction", "expect_orthogonal"])]
    detect: bool,
    /// With --detect: write the detected direction(s) here (a direction file, or a subspace file for k > 1).
    #[arg(long, value_name = "FILE", requires = "detect")]
    detected: Option<PathBuf>,
    /// With --detect: the most shared directions tried.
    #[arg(long, value_name = "K", default_value_t = 3, requires = "detect")]
    max_k: usize,
    /// One line per tensor that is not identical, not only one per kind.
    #[arg(short, long)]
    verbose: bool,
    /// Print everything as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: crate::args::Threads,
}

pub fn run(args: Args) -> Result<ExitCode> {
    args.threads.apply()?;
    if let Some(t) = args.expect_orthogonal
        && !(t.is_finite() && t >= 0.0)
    {
        bail!("--expect-orthogonal {t}: the tolerance must be a finite number >= 0");
    }
    let a = Checkpoint::open(&args.a)?;
    let b = Checkpoint::open(&args.b)?;
    if args.detect {
        return detect(&args, &a, &b);
    }
    let direction = args.direction.as_deref().map(|p| Direction::load(p, b.config.hidden_size)).transpose()?;
    let options = Options { direction: direction.as_ref().map(Direction::unit) };
    let total: u64 = b.tensors().map(|(_, t)| t.nbytes() as u64).sum::<u64>()
        + a.tensors().filter(|(_, t)| b.get(&t.name).is_none()).map(|(_, t)| t.nbytes() as u64).sum::<u64>();
    let bar = progress::bar(total, "diff", true);
    let report = diff::diff(&a, &b, &options, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    let kinds = diff::summarize(&report);
    let gate = args.expect_orthogonal.map(|t| diff::gate(&report, t));
    if args.json {
        let v = to_json(&args, &a, &b, direction.as_ref(), &report, &kinds, gate.as_ref());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", human(&args, &a, &b, direction.as_ref(), &report, &kinds, gate.as_ref()));
    }
    match gate {
        Some(g) if !g.passed() => {
            let names: Vec<String> = g
                .failures
                .iter()
                .map(|(n, v)| match v {
                    Some(v) => format!("`{n}` ({})", sci(*v)),
                    None => format!("`{n}` (not measurable: not a float tensor)"),
                })
                .collect();
            eprintln!(
                "orthogonality gate failed: {} of {} residual writers of B keep |d̂ᵀW|/|W| above {}: {}",
                g.failures.len(),
                g.writers,
                sci(g.tolerance),
                names.join(", ")
            );
            Ok(ExitCode::from(1))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `only_in_b` -> `only in B`.
fn words(label: &str) -> String {
    label.replace('_', " ").replace("in a", "in A").replace("in b", "in B")
}

/// `1.234e-5`; exact zero as `0`.
fn sci(v: f64) -> String {
    if v == 0.0 { "0".to_string() } else { format!("{v:.3e}") }
}

fn human(
    args: &Args,
    a: &Checkpoint,
    b: &Checkpoint,
    direction: Option<&Direction>,
    report: &Report,
    kinds: &[KindSummary],
    gate: Option<&Gate>,
) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("A: {} ({}, {} tensors)", args.a.display(), a.config.model_type, a.tensors().count()));
    line(format!("B: {} ({}, {} tensors)", args.b.display(), b.config.model_type, b.tensors().count()));
    if let Some(d) = direction {
        line(format!("direction: {} (sha256 {}, |r| {})", d.path.display(), &d.sha256[..12], sci(d.norm())));
    }
    let counts = status_counts(report);
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {}", words(s))).collect();
    line(format!("tensors: {}", parts.join(", ")));
    if report.config.is_empty() {
        line("config.json: identical".into());
    } else {
        line("config.json:".into());
        for c in &report.config {
            let show = |v: &Option<Value>| v.as_ref().map_or("(absent)".to_string(), |v| v.to_string());
            line(format!("  {}: {} -> {}", c.key, show(&c.a), show(&c.b)));
        }
    }
    let f = &report.files;
    if !(f.only_in_a.is_empty() && f.only_in_b.is_empty() && f.changed.is_empty()) {
        let list = |v: &[String]| v.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let mut parts = Vec::new();
        if !f.changed.is_empty() {
            parts.push(format!("changed {}", list(&f.changed)));
        }
        if !f.only_in_a.is_empty() {
            parts.push(format!("only in A {}", list(&f.only_in_a)));
        }
        if !f.only_in_b.is_empty() {
            parts.push(format!("only in B {}", list(&f.only_in_b)));
        }
        line(format!("other files: {}", parts.join("; ")));
    }
    line("by kind:".into());
    for k in kinds {
        line(format!("  {}", kind_line(k)));
    }
    // Names a reader must not miss (shape changes, tensors on one side), and with -v every change.
    let shown: Vec<&TensorDiff> = report
        .tensors
        .iter()
        .filter(|t| match t.status {
            Status::Identical => false,
            Status::Changed | Status::DtypeChanged => args.verbose,
            Status::ShapeChanged | Status::OnlyInA | Status::OnlyInB => true,
        })
        .collect();
    if !shown.is_empty() {
        line("tensors:".into());
        shown.iter().for_each(|t| line(format!("  {}", tensor_line(t))));
    }
    if let Some(g) = gate
        && g.passed()
    {
        line(format!(
            "orthogonality gate passed: {} residual writers of B, largest |d̂ᵀW|/|W| {} <= {}",
            g.writers,
            sci(g.max),
            sci(g.tolerance)
        ));
    }
    out
}

fn status_counts(report: &Report) -> Vec<(&'static str, usize)> {
    Status::ALL
        .iter()
        .map(|s| (s.label(), report.tensors.iter().filter(|t| t.status == *s).count()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// `attn_out: 2 changed; max |dW| 1.2e-2, rel |dW| 3.1e-2..4.0e-2, rank 1, alignment 1.000000, ...`
fn kind_line(k: &KindSummary) -> String {
    let counts: Vec<String> = k.counts.iter().map(|(s, n)| format!("{n} {}", words(s.label()))).collect();
    let mut s = format!("{}: {}", k.kind, counts.join(", "));
    let mut details = Vec::new();
    if let Some(m) = k.max_abs {
        details.push(format!("max |dW| {}", sci(m)));
    }
    if let Some((lo, hi)) = k.rel_frobenius {
        details.push(if lo == hi {
            format!("rel |dW| {}", sci(lo))
        } else {
            format!("rel |dW| {}..{}", sci(lo), sci(hi))
        });
    }
    if !k.ranks.is_empty() {
        let ranks: Vec<String> = k
            .ranks
            .iter()
            .map(|(r, n)| {
                let r = if r.exact { r.value.to_string() } else { format!(">{}", r.value - 1) };
                if k.ranks.len() == 1 { r } else { format!("{r} ({n})") }
            })
            .collect();
        details.push(format!("rank {}", ranks.join(", ")));
    }
    if let Some(al) = k.alignment_min {
        details.push(format!("alignment {al:.6}"));
    }
    if let Some(p) = k.projection_ratio_max {
        details.push(format!("|d̂ᵀW_B|/|d̂ᵀW_A| {}", sci(p)));
    }
    if let Some(o) = k.orthogonality_max {
        details.push(format!("|d̂ᵀW_B|/|W_B| {}", sci(o)));
    }
    if !details.is_empty() {
        s.push_str("; ");
        s.push_str(&details.join(", "));
    }
    s
}

fn tensor_line(t: &TensorDiff) -> String {
    let mut s = format!("`{}` {}", t.name, words(t.status.label()));
    match (t.status, &t.a, &t.b) {
        (Status::DtypeChanged, Some(a), Some(b)) => s.push_str(&format!(" {} -> {}", a.dtype, b.dtype)),
        (Status::ShapeChanged, Some(a), Some(b)) => s.push_str(&format!(" {:?} -> {:?}", a.shape, b.shape)),
        (Status::OnlyInA, Some(a), None) | (Status::OnlyInB, None, Some(a)) => {
            s.push_str(&format!(" ({} {:?})", a.dtype, a.shape))
        }
        _ => {}
    }
    if let Some(c) = t.change.as_ref().filter(|c| c.max_abs == 0.0) {
        // A dtype change that kept every value: nothing more to say about the values.
        let _ = c;
        s.push_str(", same values");
    } else if let Some(c) = &t.change {
        s.push_str(&format!(": max |dW| {}", sci(c.max_abs)));
        if let Some(r) = c.rel_frobenius {
            s.push_str(&format!(", rel |dW| {}", sci(r)));
        }
        s.push_str(&format!(", rank {}", rank_text(c)));
        if let Some(al) = c.alignment {
            s.push_str(&format!(", alignment {al:.6}"));
        }
        if let Some(p) = c.projection_ratio {
            s.push_str(&format!(", |d̂ᵀW_B|/|d̂ᵀW_A| {}", sci(p)));
        }
    }
    if let Some(o) = t.orthogonality {
        s.push_str(&format!(", |d̂ᵀW_B|/|W_B| {}", sci(o)));
    }
    if let Some(diff::Against::GainWeighted { norm }) = &t.against {
        s.push_str(&format!(" (d̂ = ŝ of `{norm}`)"));
    }
    s
}

/// `1`, `>12`, or per expert `1 per expert (4)` / `0, 1, 1, 2`.
fn rank_text(c: &Change) -> String {
    let one = |r: &diff::SliceRank| if r.exact { r.rank.to_string() } else { format!(">{}", diff::MAX_EXACT_RANK) };
    if c.slices.len() == 1 {
        return one(&c.slices[0]);
    }
    let ranks: Vec<String> = c.slices.iter().map(one).collect();
    if ranks.iter().all(|r| *r == ranks[0]) {
        format!("{} per expert ({})", ranks[0], ranks.len())
    } else {
        format!("per expert {}", ranks.join(", "))
    }
}

fn to_json(
    args: &Args,
    a: &Checkpoint,
    b: &Checkpoint,
    direction: Option<&Direction>,
    report: &Report,
    kinds: &[KindSummary],
    gate: Option<&Gate>,
) -> Value {
    let side = |path: &PathBuf, c: &Checkpoint| json!({"path": path.display().to_string(), "model_type": c.config.model_type, "tensors": c.tensors().count()});
    let direction = direction.map(|d| {
        json!({
            "path": d.path.display().to_string(),
            "sha256": d.sha256,
            "norm": d.norm(),
            "metadata": d.metadata,
        })
    });
    let tensor_side = |s: &Option<diff::Side>| {
        s.as_ref().map(|s| json!({"dtype": s.dtype.as_str(), "shape": s.shape, "file": s.file, "bytes": s.bytes}))
    };
    let tensors: Vec<Value> = report
        .tensors
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "kind": t.kind(),
                "status": t.status.label(),
                "a": tensor_side(&t.a),
                "b": tensor_side(&t.b),
                "change": t.change.as_ref().map(change_json),
                "against": t.against.as_ref().map(diff::Against::label),
                "orthogonality": t.orthogonality,
            })
        })
        .collect();
    let kinds: Vec<Value> = kinds
        .iter()
        .map(|k| {
            json!({
                "kind": k.kind,
                "tensors": k.tensors,
                "counts": k.counts.iter().map(|(s, n)| (s.label().to_string(), json!(n))).collect::<Map<_, _>>(),
                "max_abs": k.max_abs,
                "rel_frobenius": k.rel_frobenius.map(|(lo, hi)| json!({"min": lo, "max": hi})),
                "ranks": k.ranks.iter().map(|(r, n)| json!({"rank": r.value, "exact": r.exact, "tensors": n})).collect::<Vec<_>>(),
                "alignment_min": k.alignment_min,
                "projection_ratio_max": k.projection_ratio_max,
                "orthogonality_max": k.orthogonality_max,
            })
        })
        .collect();
    json!({
        "a": side(&args.a, a),
        "b": side(&args.b, b),
        "direction": direction,
        "counts": status_counts(report).into_iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<Map<_, _>>(),
        "config_changes": report.config.iter().map(|c| json!({"key": c.key, "a": c.a, "b": c.b})).collect::<Vec<_>>(),
        "files": {
            "changed": report.files.changed,
            "only_in_a": report.files.only_in_a,
            "only_in_b": report.files.only_in_b,
        },
        "kinds": kinds,
        "tensors": tensors,
        "rank_method": {
            "sketch_columns": sketch::SKETCH,
            "max_exact_rank": sketch::MAX_EXACT_RANK,
            "tolerance": "u(B's dtype) * sqrt(max column sum |B| * max row sum |B|), at least resolution * sigma_1",
            "resolution": sketch::RESOLUTION,
        },
        "gate": gate.map(|g| json!({
            "tolerance": g.tolerance,
            "writers": g.writers,
            "max": g.max,
            "passed": g.passed(),
            "failures": g.failures.iter().map(|(n, v)| json!({"name": n, "value": v})).collect::<Vec<_>>(),
        })),
    })
}

fn change_json(c: &Change) -> Value {
    json!({
        "max_abs": c.max_abs,
        "frobenius": c.frobenius,
        "rel_frobenius": c.rel_frobenius,
        "rank": c.rank,
        "rank_exact": c.rank_exact,
        "alignment": c.alignment,
        "projection_ratio": c.projection_ratio,
        "slices": c.slices.iter().map(|s| json!({
            "rank": s.rank,
            "exact": s.exact,
            "tolerance": s.tolerance,
            "singular_values": s.singular_values,
            "alignment": s.alignment,
        })).collect::<Vec<_>>(),
    })
}

fn layer_ranges(mut layers: Vec<usize>) -> String {
    layers.sort_unstable();
    layers.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { layers[i].to_string() } else { format!("{}-{}", layers[i], layers[j]) });
        i = j + 1;
    }
    parts.join(",")
}

/// `diff --detect`: the `diff::detect` measurements, printed; the direction(s) written on request.
fn detect(args: &Args, a: &Checkpoint, b: &Checkpoint) -> Result<ExitCode> {
    use diff::detect::Verdict;
    if args.max_k == 0 {
        bail!("--max-k 0: at least one direction must be tried");
    }
    let d = diff::detect::detect(a, b, &diff::detect::DetectOptions { max_k: args.max_k })?;
    let k = d.k();
    // The layers each kind touches.
    let mut kinds: Vec<(String, Vec<usize>, usize)> = Vec::new();
    for w in &d.writers {
        match kinds.iter_mut().find(|(kd, _, _)| *kd == w.kind) {
            Some((_, ls, n)) => {
                ls.extend(w.layer);
                *n += 1;
            }
            None => kinds.push((w.kind.clone(), w.layer.into_iter().collect(), 1)),
        }
    }
    let touched: Vec<Value> = kinds
        .iter()
        .map(|(kind, ls, n)| json!({"kind": kind, "tensors": n, "layers": layer_ranges(ls.clone())}))
        .collect();
    let norm_change = d.writers.iter().map(|w| w.norm_change).fold(0f64, f64::max);
    let what = match d.verdict {
        Verdict::NoWriterChanged => "no residual-stream writer changed: not an abliteration".to_string(),
        Verdict::Shared { k } => format!(
            "B is A with {k} shared direction{} removed from its residual-stream writers (an abliteration)",
            if k == 1 { "" } else { "s" }
        ),
        Verdict::PerLayer => "every changed writer changed along one direction of its own, not shared across layers (an abliteration with per-layer directions)"
            .to_string(),
        Verdict::NotLowRank => "the writers' changes are not a low-rank edit along a few shared directions: not an abliteration (a fine-tune, e.g. a merged LoRA, changes them otherwise)"
            .to_string(),
    };
    if let Some(path) = &args.detected {
        let vectors: Vec<f64> = (0..k).flat_map(|m| d.direction(m).to_vec()).collect();
        let mut md = Map::new();
        md.insert("source".into(), json!(format!("abliterate {} diff --detect", env!("CARGO_PKG_VERSION"))));
        md.insert("verdict".into(), json!(d.verdict.label()));
        md.insert("explained_median".into(), json!(d.explained_median.to_string()));
        md.insert("note".into(), json!("unit vector(s); the sign of a detected direction is arbitrary"));
        if k == 1 {
            direction::write(path, &vectors, checkpoint::Dtype::F32, &md)?;
        } else {
            direction::set::write_subspace(path, &vectors, k, checkpoint::Dtype::F32, &md)?;
        }
    }
    let other: Vec<Value> = d.other_changed.iter().map(|(n, kd)| json!({"name": n, "kind": kd})).collect();
    if args.json {
        let v = json!({
            "a": args.a.display().to_string(),
            "b": args.b.display().to_string(),
            "verdict": d.verdict.label(),
            "summary": what,
            "k": k,
            "explained_median": d.explained_median,
            "explained_min": d.explained_min,
            "strength": d.strength,
            "changed_writers": d.writers.len(),
            "unchanged_writers": d.unchanged_writers,
            "touched": touched,
            "written_norm_change_max": norm_change,
            "other_changed": other,
            "detected": args.detected.as_ref().map(|p| p.display().to_string()),
            "writers": d.writers.iter().map(|w| json!({
                "name": w.name, "kind": w.kind, "layer": w.layer, "rel_change": w.rel_change,
                "explained": w.explained, "own_rank_one": w.own_rank_one, "norm_change": w.norm_change,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("detect `{}` -> `{}`: {what}", args.a.display(), args.b.display());
    println!(
        "  changed residual writers: {} ({}); unchanged: {}",
        d.writers.len(),
        kinds
            .iter()
            .map(|(kd, ls, n)| if ls.is_empty() {
                format!("{n} {kd}")
            } else {
                format!("{n} {kd} (layers {})", layer_ranges(ls.clone()))
            })
            .collect::<Vec<_>>()
            .join(", "),
        d.unchanged_writers
    );
    if !d.writers.is_empty() {
        let label = if d.verdict == Verdict::PerLayer { "own top direction" } else { "shared direction(s)" };
        println!(
            "  share of each writer's change along the {label} (k = {k}): median {:.4}, min {:.4}",
            d.explained_median, d.explained_min
        );
        let e1: Vec<f64> = d.writers.iter().map(|w| w.explained[0]).collect();
        println!(
            "  top shared directions' strength: {}; one direction explains a median {:.4} of a writer's change",
            d.strength.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(", "),
            {
                let mut v = e1;
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            }
        );
        println!(
            "  norms of the written vectors: changed by at most {:.2e}{}",
            norm_change,
            if norm_change < 1e-2 { " (consistent with a norm-preserving edit)" } else { "" }
        );
    }
    if other.is_empty() {
        println!("  no other tensor changed");
    } else {
        let names: Vec<String> = d.other_changed.iter().take(6).map(|(n, kd)| format!("`{n}` ({kd})")).collect();
        println!(
            "  {} other tensor(s) changed, which weight orthogonalization never touches: {}{}",
            d.other_changed.len(),
            names.join(", "),
            if d.other_changed.len() > 6 { ", ..." } else { "" }
        );
    }
    if let Some(p) = &args.detected {
        println!("  detected direction{} written to `{}`", if k == 1 { "" } else { "s" }, p.display());
    }
    Ok(ExitCode::SUCCESS)
}
