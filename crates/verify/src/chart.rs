//! A grouped bar chart in SVG, written by hand (no plotting dependency): rates in [0, 1] with interval
//! whiskers, two or more bars per group. Deterministic text output, so reports can be compared byte for byte.

use std::fmt::Write as _;

use crate::wilson::Rate;

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 72.0;
/// Fill of the first, second, ... bar of each group (colour-blind-safe Okabe-Ito hues).
const FILLS: [&str; 4] = ["#999999", "#0072B2", "#D55E00", "#009E73"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Groups of labelled rates, each drawn as bars with `[low, high]` whiskers and the value above.
pub fn bars(title: &str, groups: &[(&str, Vec<(&str, Rate)>)]) -> String {
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let y = |v: f64| TOP + plot_h * (1.0 - v.clamp(0.0, 1.0));
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    )
    .unwrap();
    writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#).unwrap();
    writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, W / 2.0, esc(title)).unwrap();
    for tick in 0..=5 {
        let v = tick as f64 / 5.0;
        let yy = y(v);
        writeln!(s, r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#dddddd"/>"##, W - RIGHT).unwrap();
        writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.1}</text>"#, LEFT - 6.0, yy + 4.0).unwrap();
    }
    let group_w = plot_w / groups.len().max(1) as f64;
    let mut legend: Vec<&str> = Vec::new();
    for (g, (name, bars)) in groups.iter().enumerate() {
        let x0 = LEFT + g as f64 * group_w;
        let bar_w = (group_w * 0.7) / bars.len().max(1) as f64;
        for (b, (label, r)) in bars.iter().enumerate() {
            let i = legend.iter().position(|l| l == label).unwrap_or_else(|| {
                legend.push(label);
                legend.len() - 1
            });
            let x = x0 + group_w * 0.15 + b as f64 * bar_w;
            let fill = FILLS[i % FILLS.len()];
            writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"><title>{}: {:.3} [{:.3}, {:.3}] ({}/{})</title></rect>"#,
                x + 2.0,
                y(r.rate),
                bar_w - 4.0,
                y(0.0) - y(r.rate),
                esc(label),
                r.rate,
                r.low,
                r.high,
                r.k,
                r.n
            )
            .unwrap();
            let cx = x + bar_w / 2.0;
            writeln!(
                s,
                r#"<path d="M{cx:.1} {:.1}V{:.1}M{:.1} {:.1}h8M{:.1} {:.1}h8" stroke="black" fill="none"/>"#,
                y(r.low),
                y(r.high),
                cx - 4.0,
                y(r.low),
                cx - 4.0,
                y(r.high)
            )
            .unwrap();
            writeln!(s, r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{:.2}</text>"#, y(r.high) - 5.0, r.rate)
                .unwrap();
        }
        writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x0 + group_w / 2.0,
            y(0.0) + 18.0,
            esc(name)
        )
        .unwrap();
    }
    writeln!(s, r#"<line x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#, W - RIGHT, y(0.0), y(0.0))
        .unwrap();
    let mut lx = LEFT;
    for (i, label) in legend.iter().enumerate() {
        let ly = H - 22.0;
        writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/>"#,
            ly - 10.0,
            FILLS[i % FILLS.len()]
        )
        .unwrap();
        writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#, lx + 16.0, esc(label)).unwrap();
        lx += 28.0 + 7.0 * label.chars().count() as f64;
    }
    s.push_str("</svg>\n");
    s
}
