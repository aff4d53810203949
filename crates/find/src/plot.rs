//! SVG line charts like the paper's selection plots: one score per layer, one line per position, the
//! baseline as a dashed line, the pruned layers shaded and the chosen candidate circled. Plain SVG text,
//! no dependencies; values that were not computed leave gaps.

use std::fmt::Write;

use crate::Found;
use crate::select::Scored;

/// Which score a chart shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chart {
    Bypass,
    Induce,
    Kl,
}

impl Chart {
    pub const ALL: [Chart; 3] = [Chart::Bypass, Chart::Induce, Chart::Kl];

    pub fn file(self) -> &'static str {
        match self {
            Chart::Bypass => "bypass.svg",
            Chart::Induce => "induce.svg",
            Chart::Kl => "kl.svg",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Chart::Bypass => "Refusal score on harmful_val under directional ablation (bypass score; lower bypasses)",
            Chart::Induce => "Refusal score on harmless_val under activation addition (induce score; higher induces)",
            Chart::Kl => "KL(baseline || ablated), first token, harmless_val (KL score)",
        }
    }

    fn value(self, s: &Scored) -> Option<f64> {
        match self {
            Chart::Bypass => s.bypass,
            Chart::Induce => s.induce,
            Chart::Kl => s.kl,
        }
    }
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;
const COLORS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// A "nice" tick step for a range (1, 2 or 5 times a power of ten).
fn step(span: f64) -> f64 {
    let raw = span / 6.0;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG text of one chart.
pub fn svg(found: &Found, chart: Chart) -> String {
    let layers = found.layers;
    let baseline = match chart {
        Chart::Bypass => Some(found.baseline_harmful_val),
        Chart::Induce => Some(found.baseline_harmless_val),
        Chart::Kl => None,
    };
    let values: Vec<f64> =
        found.scores.iter().filter_map(|s| chart.value(s)).filter(|v| v.is_finite()).chain(baseline).collect();
    let (mut lo, mut hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if chart == Chart::Kl {
        lo = 0.0;
        hi = hi.max(found.select.kl_max * 1.2);
    }
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let st = step(hi - lo);
    let (lo, hi) = ((lo / st).floor() * st, (hi / st).ceil() * st);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |l: f64| LEFT + pw * l / (layers.max(2) - 1) as f64;
    let y = |v: f64| TOP + ph * (1.0 - (v - lo) / (hi - lo));

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        esc(chart.title())
    );
    // Pruned layers.
    let fp = found.select.first_pruned_layer;
    if fp < layers {
        let x0 = x(fp as f64 - 0.5).max(LEFT);
        let _ = writeln!(
            o,
            "<rect x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#eeeeee\"/><text x=\"{:.1}\" y=\"{:.1}\" \
             fill=\"#888\" text-anchor=\"middle\">pruned</text>",
            LEFT + pw - x0,
            (x0 + LEFT + pw) / 2.0,
            TOP + 14.0
        );
    }
    // Grid and axes.
    let mut v = lo;
    while v <= hi + st / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" \
             text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            trim(v, st)
        );
        v += st;
    }
    let every = (layers / 15).max(1);
    for l in (0..layers).step_by(every) {
        let _ =
            writeln!(o, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{l}</text>"#, x(l as f64), TOP + ph + 18.0);
    }
    let _ = writeln!(
        o,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/><text x=\"{:.1}\" \
         y=\"{:.1}\" text-anchor=\"middle\">layer (residual stream entering it)</text>",
        LEFT + pw / 2.0,
        H - 12.0
    );
    if let Some(b) = baseline {
        let _ = writeln!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yb:.1}\" y2=\"{yb:.1}\" stroke=\"#000\" stroke-dasharray=\"5,4\"/>",
            LEFT + pw,
            yb = y(b)
        );
    }
    if chart == Chart::Kl {
        let yt = y(found.select.kl_max);
        let _ = writeln!(
            o,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yt:.1}\" y2=\"{yt:.1}\" stroke=\"#d62728\" stroke-dasharray=\"2,3\"/>",
            LEFT + pw
        );
    }
    // One line per position; gaps where a score was not computed.
    for (pi, &pos) in found.positions.iter().enumerate() {
        let color = COLORS[pi % COLORS.len()];
        let mut path = String::new();
        let mut pen = false;
        for l in 0..layers {
            match chart.value(&found.scores[pi * layers + l]).filter(|v| v.is_finite()) {
                Some(v) => {
                    let _ = write!(path, "{}{:.1},{:.1} ", if pen { "L" } else { "M" }, x(l as f64), y(v));
                    pen = true;
                }
                None => pen = false,
            }
        }
        if !path.is_empty() {
            let _ = writeln!(o, r#"<path d="{}" fill="none" stroke="{color}" stroke-width="1.6"/>"#, path.trim_end());
        }
        let ly = TOP + 16.0 * pi as f64 + 8.0;
        let token = found.post_instruction_text.get(pi).map(|t| format!("{t:?}")).unwrap_or_default();
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">pos {pos} {}</text>"#,
            LEFT + pw + 10.0,
            LEFT + pw + 28.0,
            LEFT + pw + 32.0,
            ly + 4.0,
            esc(&token)
        );
    }
    let ly = TOP + 16.0 * found.positions.len() as f64 + 16.0;
    if baseline.is_some() {
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="black" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}">baseline</text>"#,
            LEFT + pw + 10.0,
            LEFT + pw + 28.0,
            LEFT + pw + 32.0,
            ly + 4.0
        );
    }
    // The choice.
    let c = found.chosen();
    if let Some(v) = chart.value(c).filter(|v| v.is_finite()) {
        let (cx, cy) = (x(c.layer as f64), y(v));
        let _ = writeln!(
            o,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="7" fill="none" stroke="black" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-weight="bold">chosen ({}, {})</text>"#,
            cx + 9.0,
            cy - 9.0,
            c.position,
            c.layer
        );
    }
    o.push_str("</svg>\n");
    o
}

/// A tick label with as many decimals as the step needs.
fn trim(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    format!("{v:.decimals$}")
}
