//! The search as Markdown (`report.md`: settings, the Pareto front as a table, the choice) and as an SVG
//! scatter of refusals against KL (`pareto.svg`: every trial, the front joined as a step line, the choice
//! circled, the KL bound dashed). Plain text, deterministic; no plotting dependency.

use std::fmt::Write as _;

use crate::pareto::{Score, front};
use crate::store::Trial;

/// What the report states besides the trials.
pub struct Context<'a> {
    pub model: &'a str,
    pub seed: u64,
    pub startup: usize,
    pub max_kl: f64,
    pub max_new_tokens: usize,
    pub judge: &'a str,
    pub harmful: &'a str,
    pub harmless: &'a str,
    pub chosen: Option<usize>,
}

fn params_cells(t: &Trial) -> String {
    let p = &t.params;
    let direction = if p.per_layer { "per layer".to_string() } else { format!("index {:.3}", p.index) };
    let projected = if p.projected { ", projected" } else { "" };
    format!("{direction}{projected} | {:.3} | {:.3} | {}", p.attn, p.mlp, if p.norm_preserving { "yes" } else { "no" })
}

/// `report.md`.
pub fn markdown(trials: &[Trial], c: &Context<'_>) -> String {
    let mut md = String::new();
    write_md(&mut md, trials, c).expect("writing to a String cannot fail");
    md
}

fn write_md(md: &mut String, trials: &[Trial], c: &Context<'_>) -> std::fmt::Result {
    let scores: Vec<Score> = trials.iter().map(Trial::score).collect();
    let f = front(&scores);
    writeln!(md, "# abliterate optimize: `{}`\n", c.model)?;
    writeln!(
        md,
        "{} trials ({} uniform, then multi-objective TPE), seed {}. Each trial is measured with hooks on the original \
         model (no checkpoint written): harmful refusals = greedy completions of {} (at most {} new tokens) judged by \
         the {} judge; KL = mean first-token KL(original ‖ trial) on {}. The second judge also counts degenerate \
         output (empty, or a repetition loop) as a refusal. docs/optimize.md defines the space and the sampler.\n",
        trials.len(),
        c.startup.min(trials.len()),
        c.seed,
        c.harmful,
        c.max_new_tokens,
        c.judge,
        c.harmless
    )?;
    writeln!(md, "![refusals against KL](pareto.svg)\n")?;
    writeln!(md, "## Pareto front ({} of {} trials)\n", f.len(), trials.len())?;
    writeln!(
        md,
        "Kernels are `peak,position,min,width` (weight `peak` at layer `position`, falling linearly to `min` at \
         distance `width`, 0 beyond).\n"
    )?;
    writeln!(md, "| trial | refusals | second judge | KL | direction | attn kernel | mlp kernel | norm-preserving |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for &i in &f {
        let t = &trials[i];
        let mark = if c.chosen == Some(i) { " (chosen)" } else { "" };
        writeln!(
            md,
            "| {}{mark} | {}/{} | {}/{} | {:.4} | {} |",
            t.number,
            t.refusals,
            t.n_harmful,
            t.refusals_second,
            t.n_harmful,
            t.kl,
            params_cells(t)
        )?;
    }
    writeln!(md, "\n## Choice\n")?;
    match c.chosen {
        Some(i) => writeln!(
            md,
            "Rule: the fewest refusals among trials with KL <= {} (`--max-kl`), then the smallest KL, then the earliest \
             trial. Chosen: **trial {}** ({} refusals of {}, KL {:.4}); its edit is in `model/`, verified in `verify/`.",
            c.max_kl, trials[i].number, trials[i].refusals, trials[i].n_harmful, trials[i].kl
        )?,
        None => writeln!(md, "No trial has KL <= {} (`--max-kl`); nothing was chosen.", c.max_kl)?,
    }
    let secs: f64 = trials.iter().map(|t| t.seconds).sum();
    writeln!(md, "\nTrials took {secs:.1} s in all (sum over trials, as recorded in `trials.jsonl`).")?;
    let pruned = trials.iter().filter(|t| t.pruned).count();
    writeln!(
        md,
        "{pruned} of {} trials were pruned: their completions stopped once an earlier trial dominated them (their \
         refusal counts in `trials.jsonl` are lower bounds; a pruned trial is never on the front nor chosen).",
        trials.len()
    )?;
    Ok(())
}

const W: f64 = 640.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;

/// `pareto.svg`: refusals (y) against KL (x).
pub fn svg(trials: &[Trial], chosen: Option<usize>, max_kl: f64) -> String {
    let mut s = String::new();
    write_svg(&mut s, trials, chosen, max_kl).expect("writing to a String cannot fail");
    s
}

fn write_svg(s: &mut String, trials: &[Trial], chosen: Option<usize>, max_kl: f64) -> std::fmt::Result {
    let scores: Vec<Score> = trials.iter().map(Trial::score).collect();
    let f = front(&scores);
    let kl_hi = scores.iter().map(|t| t.kl).fold(max_kl, f64::max).max(1e-12) * 1.05;
    let r_hi = trials.iter().map(|t| t.n_harmful).max().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |kl: f64| LEFT + pw * (kl / kl_hi);
    let y = |r: f64| TOP + ph * (1.0 - r / r_hi);
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#)?;
    writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Harmful refusals against first-token KL ({} trials)</text>"#,
        W / 2.0,
        trials.len()
    )?;
    for k in 0..=5 {
        let v = kl_hi * k as f64 / 5.0;
        writeln!(s, r##"<line x1="{0:.1}" x2="{0:.1}" y1="{TOP}" y2="{1}" stroke="#eeeeee"/>"##, x(v), H - BOTTOM)?;
        writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{v:.3}</text>"#, x(v), H - BOTTOM + 16.0)?;
        let r = r_hi * k as f64 / 5.0;
        writeln!(s, r##"<line x1="{LEFT}" x2="{}" y1="{1:.1}" y2="{1:.1}" stroke="#eeeeee"/>"##, W - RIGHT, y(r))?;
        writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{r:.0}</text>"#, LEFT - 6.0, y(r) + 4.0)?;
    }
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">mean first-token KL on harmless prompts</text>"#,
        LEFT + pw / 2.0,
        H - 12.0
    )?;
    writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">harmful refusals (of {1})</text>"#,
        TOP + ph / 2.0,
        r_hi
    )?;
    writeln!(
        s,
        r##"<line x1="{0:.1}" x2="{0:.1}" y1="{TOP}" y2="{1}" stroke="#D55E00" stroke-dasharray="4 3"><title>--max-kl {2}</title></line>"##,
        x(max_kl),
        H - BOTTOM,
        max_kl
    )?;
    // The front as a step line, in increasing KL.
    let mut pts: Vec<Score> = f.iter().map(|&i| scores[i]).collect();
    pts.sort_by(|a, b| a.kl.total_cmp(&b.kl));
    let mut path = String::new();
    for (k, p) in pts.iter().enumerate() {
        if k > 0 {
            write!(path, " L{:.1},{:.1}", x(p.kl), y(pts[k - 1].refusals as f64))?;
        }
        write!(path, " {}{:.1},{:.1}", if k == 0 { "M" } else { "L" }, x(p.kl), y(p.refusals as f64))?;
    }
    if !path.is_empty() {
        writeln!(s, r##"<path d="{}" fill="none" stroke="#0072B2"/>"##, path.trim())?;
    }
    for (i, t) in trials.iter().enumerate() {
        let on = f.contains(&i);
        writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="{}" fill="{}"><title>trial {}: {} refusals, KL {:.4}</title></circle>"##,
            x(t.kl),
            y(t.refusals as f64),
            if on { 4 } else { 3 },
            if on { "#0072B2" } else { "#999999" },
            t.number,
            t.refusals,
            t.kl
        )?;
    }
    if let Some(i) = chosen {
        let t = &trials[i];
        writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="8" fill="none" stroke="#D55E00" stroke-width="2"><title>chosen: trial {}</title></circle>"##,
            x(t.kl),
            y(t.refusals as f64),
            t.number
        )?;
    }
    writeln!(s, "</svg>")
}
