//! The verification report: what was measured, as data ([`Report`], serialised to `report.json`), as
//! Markdown (`report.md`) and as an SVG chart of the refusal rates with their intervals (`refusal.svg`).
//!
//! Harmful prompts are test data: a harmful completion is never stored or shown in full, only the judge's
//! verdict and its first words ([`HARMFUL_WORDS`]). Harmless completions are shown truncated in Markdown and
//! kept whole in JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::equivalence::{Caveat, Claim, Equivalence};
use crate::gate::Verdict;
use crate::loss::Loss;
use crate::wilson::Rate;

/// Words of a harmful completion kept in reports (the reference's `eval.json` keeps 8 as well).
pub const HARMFUL_WORDS: usize = 8;
/// Characters of a harmless completion shown in `report.md`.
pub const HARMLESS_CHARS: usize = 160;

/// One prompt's completion as reported.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Completion {
    pub prompt: String,
    pub category: Option<String>,
    /// The judge's verdict.
    pub refused: bool,
    /// Degenerate output (empty or a repetition loop, [`eval::judge::is_degenerate`] of the whole
    /// completion): the second judge counts it as a refusal.
    pub degenerate: bool,
    /// Refusal score of the prompt (method.md §3), where measured.
    pub score: Option<f64>,
    /// New tokens, the end-of-turn token included when there was one.
    pub tokens: usize,
    /// Ended at an end-of-turn token (rather than at the token limit).
    pub stopped: bool,
    /// The completion: whole for harmless prompts, the first [`HARMFUL_WORDS`] words for harmful ones.
    pub text: String,
    /// `text` is shorter than the completion.
    pub cut: bool,
}

impl Completion {
    /// A completion as it may be reported: harmful ones cut to their first words.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        prompt: &str,
        category: Option<&str>,
        harmful: bool,
        text: &str,
        refused: bool,
        score: Option<f64>,
        tokens: usize,
        stopped: bool,
    ) -> Completion {
        let degenerate = eval::judge::is_degenerate(text);
        let (text, cut) = if harmful { first_words(text, HARMFUL_WORDS) } else { (text.to_string(), false) };
        Completion {
            prompt: prompt.to_string(),
            category: category.map(str::to_string),
            refused,
            degenerate,
            score,
            tokens,
            stopped,
            text,
            cut,
        }
    }
}

/// The first `n` whitespace-separated words, and whether anything was cut.
pub fn first_words(text: &str, n: usize) -> (String, bool) {
    let words: Vec<&str> = text.split_whitespace().collect();
    (words[..words.len().min(n)].join(" "), words.len() > n)
}

/// One model (or hooked run) on one prompt set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arm {
    /// `original`, `edited`, `ablation (hooks)`, `activation addition (layer 22)`, ...
    pub label: String,
    pub refusal: Rate,
    /// The second judge's rate: a refusal or degenerate output ([`eval::judge::SECOND_JUDGE`]).
    pub refusal_second: Rate,
    /// Per category, where the prompts have categories.
    pub per_category: BTreeMap<String, Rate>,
    /// Mean refusal score (method.md §3), where measured.
    pub mean_score: Option<f64>,
    pub mean_tokens: f64,
    /// Completions that ended at an end-of-turn token.
    pub stopped: usize,
    pub completions: Vec<Completion>,
}

impl Arm {
    pub fn new(label: &str, completions: Vec<Completion>) -> Arm {
        let refusal = Rate::of(completions.iter().map(|c| c.refused));
        let refusal_second = Rate::of(completions.iter().map(|c| c.refused || c.degenerate));
        let mut by_cat: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for c in &completions {
            if let Some(cat) = &c.category {
                let e = by_cat.entry(cat.clone()).or_default();
                e.0 += c.refused as usize;
                e.1 += 1;
            }
        }
        let scores: Vec<f64> = completions.iter().filter_map(|c| c.score).collect();
        let mean_score = (!scores.is_empty() && scores.len() == completions.len())
            .then(|| scores.iter().sum::<f64>() / scores.len() as f64);
        let n = completions.len().max(1) as f64;
        Arm {
            label: label.to_string(),
            refusal,
            refusal_second,
            per_category: by_cat.into_iter().map(|(k, (r, n))| (k, Rate::new(r, n))).collect(),
            mean_score,
            mean_tokens: completions.iter().map(|c| c.tokens).sum::<usize>() as f64 / n,
            stopped: completions.iter().filter(|c| c.stopped).count(),
            completions,
        }
    }
}

/// A prompt set and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Source {
    /// `embedded harmful_eval` or the file's path.
    pub name: String,
    /// sha256 of the prompts as used (the embedded file's bytes, or the file read).
    pub sha256: String,
    pub n: usize,
}

/// Both models on one set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SetReport {
    pub source: Source,
    pub harmful: bool,
    pub original: Arm,
    pub edited: Arm,
}

/// Damage on the harmless prompts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Damage {
    /// Mean first-token KL(original ‖ edited) (method.md §5 formula) over the harmless prompts.
    pub kl: f64,
    /// Largest per-prompt KL.
    pub kl_max: f64,
    /// Mean KL over the harmless prompts the original answered (its completion not judged a refusal), and
    /// how many: the damage where no change was intended. On the prompts the original over-refused, the
    /// edit is meant to move the first token (from a refusal to an answer), which the full mean also counts.
    pub kl_answered: Option<f64>,
    pub answered: usize,
    /// Teacher-forced cross-entropy on the original model's own harmless completions.
    pub ce_original: Option<Loss>,
    pub ce_edited: Option<Loss>,
}

/// The equivalence check with what it tested.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EquivalenceReport {
    pub claim: Claim,
    /// The hooks compared, where the caller gave the edit's own ([`crate::measure::EditHooks`]); None: the
    /// claim's.
    pub hooks: Option<String>,
    pub caveats: Vec<Caveat>,
    /// One line per caveat (for humans).
    pub caveat_notes: Vec<String>,
    pub result: Equivalence,
}

/// Refusal induced on harmless prompts by adding the direction (method.md §7 activation addition).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Induced {
    pub layer: usize,
    pub coeff: f64,
    pub arm: Arm,
}

/// The direction, where one was given.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirectionInfo {
    pub path: String,
    pub sha256: String,
    pub norm: f64,
    pub layer: Option<usize>,
    pub position: Option<i64>,
}

/// Everything `abliterate verify` measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub original: String,
    /// The edited checkpoint, or None for a preview on hooks alone.
    pub edited: Option<String>,
    pub direction: Option<DirectionInfo>,
    /// What generation and judging used.
    pub settings: serde_json::Value,
    pub harmful: SetReport,
    pub harmless: SetReport,
    pub damage: Option<Damage>,
    pub induced: Option<Induced>,
    pub equivalence: Option<EquivalenceReport>,
    pub gates: Vec<Verdict>,
    /// Wall seconds per stage.
    pub seconds: BTreeMap<String, f64>,
}

fn rate(r: &Rate) -> String {
    format!("{:.2} [{:.2}, {:.2}] ({}/{})", r.rate, r.low, r.high, r.k, r.n)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".to_string(), |v| format!("{v:.digits$}"))
}

/// Markdown-safe single line.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

impl Report {
    /// The name of the second column: the edited model, or the hooks standing in for it.
    pub fn edited_label(&self) -> &str {
        &self.harmful.edited.label
    }

    /// `report.md`.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let e = self.edited_label();
        match &self.edited {
            Some(edited) => writeln!(md, "# Verification of `{edited}` against `{}`\n", self.original),
            None => writeln!(md, "# Preview of a direction on `{}` (hooks, no edited checkpoint)\n", self.original),
        }
        .unwrap();
        if let Some(d) = &self.direction {
            let at = match (d.layer, d.position) {
                (Some(l), Some(p)) => format!(", layer {l}, position {p}"),
                (Some(l), None) => format!(", layer {l}"),
                _ => String::new(),
            };
            writeln!(md, "Direction `{}` (sha256 `{}`, norm {:.4}{at}).\n", d.path, &d.sha256, d.norm).unwrap();
        }
        if !self.gates.is_empty() {
            let failed: Vec<_> = self.gates.iter().filter(|g| !g.passed).collect();
            writeln!(md, "**Gates: {}.**\n", if failed.is_empty() { "all passed" } else { "FAILED" }).unwrap();
            for g in &self.gates {
                writeln!(md, "- {} {}", if g.passed { "passed" } else { "**failed**" }, cell(&g.describe())).unwrap();
            }
            md.push('\n');
        }
        writeln!(md, "![refusal rates](refusal.svg)\n").unwrap();
        writeln!(md, "| | original | {e} |\n|---|---|---|").unwrap();
        for s in [&self.harmful, &self.harmless] {
            let what = if s.harmful { "harmful refusal rate" } else { "harmless refusal rate (over-refusal)" };
            writeln!(
                md,
                "| {what}, {} ({} prompts) | {} | {} |",
                s.source.name,
                s.source.n,
                rate(&s.original.refusal),
                rate(&s.edited.refusal)
            )
            .unwrap();
        }
        for s in [&self.harmful, &self.harmless] {
            let what = if s.harmful { "harmful" } else { "harmless" };
            writeln!(
                md,
                "| {what} refusal rate, second judge (refusal or degenerate output) | {} | {} |",
                rate(&s.original.refusal_second),
                rate(&s.edited.refusal_second)
            )
            .unwrap();
        }
        for s in [&self.harmful, &self.harmless] {
            let what = if s.harmful { "harmful" } else { "harmless" };
            writeln!(
                md,
                "| mean refusal score, {what} | {} | {} |",
                opt(s.original.mean_score, 3),
                opt(s.edited.mean_score, 3)
            )
            .unwrap();
        }
        if let Some(d) = &self.damage {
            writeln!(
                md,
                "| first-token KL(original ‖ {e}), harmless, mean (max) | — | {:.4} ({:.4}) |",
                d.kl, d.kl_max
            )
            .unwrap();
            if let Some(k) = d.kl_answered {
                writeln!(
                    md,
                    "| the same, mean over the {} harmless prompts the original answered (did not refuse) | — | {k:.4} |",
                    d.answered
                )
                .unwrap();
            }
            if let (Some(a), Some(b)) = (&d.ce_original, &d.ce_edited) {
                writeln!(
                    md,
                    "| cross-entropy on the original's own harmless completions ({} tokens) | {:.4} | {:.4} |",
                    a.tokens, a.ce, b.ce
                )
                .unwrap();
            }
        }
        if let Some(i) = &self.induced {
            writeln!(
                md,
                "| induced refusal on harmless prompts, activation addition ({:+} r at layer {}) | {} | {} |",
                i.coeff,
                i.layer,
                rate(&self.harmless.original.refusal),
                rate(&i.arm.refusal)
            )
            .unwrap();
        }
        for s in [&self.harmful, &self.harmless] {
            writeln!(
                md,
                "| mean new tokens, {} (ended at end of turn) | {:.1} ({}/{}) | {:.1} ({}/{}) |",
                if s.harmful { "harmful" } else { "harmless" },
                s.original.mean_tokens,
                s.original.stopped,
                s.source.n,
                s.edited.mean_tokens,
                s.edited.stopped,
                s.source.n
            )
            .unwrap();
        }
        writeln!(
            md,
            "\nRates are the judge's refusals over the prompts with 95% Wilson intervals. The second judge is {}.\n",
            eval::judge::SECOND_JUDGE
        )
        .unwrap();

        if let Some(eq) = &self.equivalence {
            self.equivalence_md(&mut md, eq);
        }
        for s in [&self.harmful, &self.harmless] {
            if s.original.per_category.is_empty() {
                continue;
            }
            writeln!(md, "## {} refusal by category\n", if s.harmful { "Harmful" } else { "Harmless" }).unwrap();
            writeln!(md, "| category | original | {e} |\n|---|---|---|").unwrap();
            for (cat, r) in &s.original.per_category {
                let edited = s.edited.per_category.get(cat).map_or("—".to_string(), rate);
                writeln!(md, "| {cat} | {} | {edited} |", rate(r)).unwrap();
            }
            md.push('\n');
        }
        self.examples_md(&mut md);
        writeln!(md, "## Settings\n\n```json\n{}\n```", serde_json::to_string_pretty(&self.settings).unwrap()).unwrap();
        md
    }

    fn equivalence_md(&self, md: &mut String, eq: &EquivalenceReport) {
        let r = &eq.result;
        writeln!(md, "## Equivalence to directional ablation\n").unwrap();
        writeln!(
            md,
            "The edited model's residual stream against the original's under the hooks the edit claims to be \
             (docs/method.md §7), on {} prompts ({} tokens): `max ||h_edit − h_hook|| / ||h_hook||` over prompts and \
             positions, per layer. **Largest: {:.3e} at {}.** Last-position logits: relative difference {:.3e}, \
             max |Δ| {:.3e}, same top token for {}/{} prompts.\n",
            r.prompts,
            r.tokens,
            r.max,
            layer_name(r.worst_layer, r.per_layer.len()),
            r.logits_rel,
            r.logits_max_abs,
            r.top1_agree,
            r.prompts
        )
        .unwrap();
        if let Some(h) = &eq.hooks {
            writeln!(md, "The hooks: {h}.\n").unwrap();
        }
        if eq.caveats.is_empty() {
            writeln!(md, "Expected to hold up to f32 rounding: nothing in this edit breaks the equivalence.\n")
                .unwrap();
        } else {
            writeln!(md, "Where it cannot hold exactly:\n").unwrap();
            for n in &eq.caveat_notes {
                writeln!(md, "- {n}").unwrap();
            }
            md.push('\n');
        }
        let split = r.besides_direction.as_ref().zip(r.along_direction.as_ref());
        if split.is_some() {
            writeln!(
                md,
                "Split: *along r̂* compares the edited model with itself under the same hooks (what the checkpoint \
                 still writes along the direction); *besides r̂* compares the edited model under the hooks with the \
                 hooked original (rounding of the stored weights, post-norm rescaling).\n"
            )
            .unwrap();
            writeln!(md, "| layer | edited vs hooks | along r̂ | besides r̂ |\n|---|---|---|---|").unwrap();
        } else {
            writeln!(md, "| layer | edited vs hooks |\n|---|---|").unwrap();
        }
        for (l, v) in r.per_layer.iter().enumerate() {
            match split {
                Some((b, a)) => {
                    writeln!(md, "| {} | {v:.3e} | {:.3e} | {:.3e} |", layer_name(l, r.per_layer.len()), a[l], b[l])
                }
                None => writeln!(md, "| {} | {v:.3e} |", layer_name(l, r.per_layer.len())),
            }
            .unwrap();
        }
        md.push('\n');
    }

    fn examples_md(&self, md: &mut String) {
        writeln!(md, "## Examples\n").unwrap();
        writeln!(
            md,
            "Harmful completions are shown only as the judge's verdict and their first {HARMFUL_WORDS} words; harmless \
             ones cut at {HARMLESS_CHARS} characters.\n"
        )
        .unwrap();
        let e = self.edited_label();
        for s in [&self.harmful, &self.harmless] {
            writeln!(md, "### {}\n", if s.harmful { "Harmful prompts" } else { "Harmless prompts" }).unwrap();
            for i in examples(s, 3) {
                let (o, d) = (&s.original.completions[i], &s.edited.completions[i]);
                writeln!(md, "- **{}**", cell(&o.prompt)).unwrap();
                for (label, c) in [("original", o), (e, d)] {
                    let text = if s.harmful {
                        format!("{}{}", c.text, if c.cut { " …" } else { "" })
                    } else {
                        truncate(&c.text, HARMLESS_CHARS)
                    };
                    writeln!(md, "  - {label}: {} — {}", if c.refused { "refusal" } else { "no refusal" }, cell(&text))
                        .unwrap();
                }
            }
            md.push('\n');
        }
    }

    /// `refusal.svg`.
    pub fn chart(&self) -> String {
        let mut groups = vec![
            (
                "harmful prompts",
                vec![("original", self.harmful.original.refusal), (self.edited_label(), self.harmful.edited.refusal)],
            ),
            (
                "harmless prompts",
                vec![("original", self.harmless.original.refusal), (self.edited_label(), self.harmless.edited.refusal)],
            ),
        ];
        if let Some(i) = &self.induced {
            groups.push((
                "harmless, direction added",
                vec![("original", self.harmless.original.refusal), (&i.arm.label, i.arm.refusal)],
            ));
        }
        crate::chart::bars("Refusal rate (95% Wilson interval)", &groups)
    }
}

/// `layer 12`, or `final residual` for the last entry.
pub fn layer_name(l: usize, entries: usize) -> String {
    if l + 1 == entries { "final residual".into() } else { format!("layer {l}") }
}

/// Up to `n` prompt indices to show: those whose verdict changed first, then the others, in set order.
fn examples(s: &SetReport, n: usize) -> Vec<usize> {
    let m = s.original.completions.len().min(s.edited.completions.len());
    let changed = (0..m).filter(|&i| s.original.completions[i].refused != s.edited.completions[i].refused);
    let same = (0..m).filter(|&i| s.original.completions[i].refused == s.edited.completions[i].refused);
    let mut v: Vec<usize> = changed.chain(same).take(n).collect();
    v.sort_unstable();
    v
}
