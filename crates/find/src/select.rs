//! Selection of one candidate (method.md §5): which scores to compute, the paper's filter, the choice by
//! bypass score, the project's fallbacks, and the margins that show whether a choice hinges on the last
//! digits of a score.
//!
//! Only the shortcuts of method.md §5 that leave the choice and every computed score unchanged are used:
//! pruned layers are not scored (item 1), induce is computed first and KL only for candidates at or above
//! the induce threshold, bypass only for candidates that pass the KL and induce filters (item 2: a
//! candidate that fails one filter is discarded whatever its other scores, and a candidate below the
//! induce threshold is not eligible for the KL fallback either; the relaxation asks for the KL of the
//! others), a candidate that is exactly zero gets the baseline scores without a forward
//! pass (its hooks are no-ops, method.md §4). `--all-scores` computes everything. [`choose`] works from
//! the scores alone, so the exhaustive and the shortcut runs are compared by calling it on both.
//!
//! Pure logic; the forward passes are behind [`Evaluate`].

use serde::Serialize;

use crate::{FindError, Result};

/// How candidates are filtered and chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectOptions {
    /// method.md §5: discard a candidate whose KL score is above this (0.1).
    pub kl_max: f64,
    /// method.md §5: only layers `l < int(L × fraction)` may be chosen (0.8: the last 20% pruned).
    pub max_layer_fraction: f64,
    /// method.md §5: discard a candidate whose induce score is below this (0.0).
    pub min_induce: f64,
    /// Only these positions may be chosen (all post-instruction positions by default).
    pub positions: Option<Vec<i64>>,
    /// Compute all three scores of every candidate (for the report), not only what the choice needs.
    pub all_scores: bool,
    /// method.md §5's optional relaxation, for a model that never produces its refusal token: when no
    /// candidate passes and the KL fallback finds none either, drop the induce filter.
    pub relax_induce: bool,
}

impl Default for SelectOptions {
    fn default() -> SelectOptions {
        SelectOptions {
            kl_max: 0.1,
            max_layer_fraction: 0.8,
            min_induce: 0.0,
            positions: None,
            all_scores: false,
            relax_induce: false,
        }
    }
}

impl SelectOptions {
    /// The first layer that may not be chosen: `int(L × fraction)`, truncated as Python's `int()`.
    pub fn first_pruned(&self, layers: usize) -> usize {
        ((layers as f64 * self.max_layer_fraction) as usize).min(layers)
    }
}

/// One candidate's scores (`None`: not computed) and the filter rule it failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scored {
    pub position: i64,
    pub layer: usize,
    /// `||r||` in f64.
    pub norm: f64,
    /// `||r|| <= 1e-6 ×` the largest candidate norm (method.md §5): never chosen.
    pub degenerate: bool,
    #[serde(rename = "kl_score")]
    pub kl: Option<f64>,
    #[serde(rename = "induce_score")]
    pub induce: Option<f64>,
    #[serde(rename = "bypass_score")]
    pub bypass: Option<f64>,
    /// The first filter rule it fails (method.md §5 order: NaN, layer, KL, induce; then degenerate), or
    /// `None` when it passes. Decided from the scores that were computed.
    pub rejected: Option<String>,
}

/// Which rule made the choice.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// The paper's: the smallest bypass score among the candidates that pass the filter.
    Filter,
    /// Project fallback (method.md §5): nothing passed; the smallest KL among allowed-layer candidates
    /// with an induce score at or above the threshold, which equals the paper's rule with the KL
    /// threshold raised to `threshold`.
    MinKl { threshold: f64 },
    /// Optional relaxation: the induce filter dropped; the smallest bypass among allowed-layer
    /// candidates with KL at or below the threshold.
    RelaxedBypass,
    /// Optional relaxation, last resort: the smallest KL among allowed-layer candidates.
    RelaxedMinKl,
}

impl Rule {
    pub fn describe(&self) -> String {
        match self {
            Rule::Filter => "the paper's rule: smallest bypass score among candidates passing the filter".into(),
            Rule::MinKl { threshold } => format!(
                "fallback (method.md §5): no candidate passed the filter; smallest KL among allowed-layer candidates \
                 with induce >= threshold (the paper's rule with the KL threshold raised to {threshold:.6})"
            ),
            Rule::RelaxedBypass => {
                "relaxation (method.md §5): induce filter dropped; smallest bypass among allowed-layer candidates with \
                 KL within the threshold"
                    .into()
            }
            Rule::RelaxedMinKl => "relaxation (method.md §5): smallest KL among allowed-layer candidates".into(),
        }
    }
}

/// How close the choice came to being different.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Margins {
    /// The runner-up under the rule that chose (smallest bypass, or smallest KL for a KL rule) and its
    /// gap to the choice (positive: the choice is better by that much).
    pub runner_up: Option<Near>,
    /// Among allowed candidates that fail only the KL threshold: the smallest KL, as `value − kl_max`.
    pub closest_above_kl: Option<Near>,
    /// Among allowed candidates below the induce threshold (whatever their KL, which the shortcuts do not
    /// compute for them): the largest induce, as `min_induce − value`.
    pub closest_below_induce: Option<Near>,
}

/// A candidate and a distance.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Near {
    pub position: i64,
    pub layer: usize,
    pub value: f64,
    pub gap: f64,
}

/// The selection: the chosen candidate (an index into the scores), the rule and the margins.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    pub index: usize,
    pub position: i64,
    pub layer: usize,
    pub rule: Rule,
    pub margins: Margins,
}

/// Computes one candidate's scores (forward passes).
pub trait Evaluate {
    fn kl(&mut self, index: usize) -> Result<f64>;
    fn induce(&mut self, index: usize) -> Result<f64>;
    fn bypass(&mut self, index: usize) -> Result<f64>;
    /// Called before a batch of evaluations of one kind (for progress).
    fn plan(&mut self, _kind: ScoreKind, _count: usize) {}
}

/// The three scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreKind {
    Kl,
    Induce,
    Bypass,
}

fn nan(v: Option<f64>) -> bool {
    v.is_some_and(f64::is_nan)
}

/// The first filter rule a candidate fails (method.md §5 `filter_fn` order), from what is computed.
fn rejection(s: &Scored, opts: &SelectOptions, first_pruned: usize) -> Option<String> {
    if nan(s.kl) || nan(s.induce) || nan(s.bypass) {
        return Some("a score is NaN".into());
    }
    if s.layer >= first_pruned {
        return Some(format!("layer >= {first_pruned} (pruned: int(L x {}))", opts.max_layer_fraction));
    }
    if opts.positions.as_ref().is_some_and(|p| !p.contains(&s.position)) {
        return Some("position not in --positions".into());
    }
    if s.kl.is_some_and(|k| k > opts.kl_max) {
        return Some(format!("kl_score > {}", opts.kl_max));
    }
    if s.induce.is_some_and(|i| i < opts.min_induce) {
        return Some(format!("induce_score < {}", opts.min_induce));
    }
    if s.degenerate {
        return Some("degenerate (norm <= 1e-6 x the largest)".into());
    }
    None
}

/// Whether a candidate may be chosen at all: an allowed layer and position, not degenerate.
fn allowed(s: &Scored, opts: &SelectOptions, first_pruned: usize) -> bool {
    s.layer < first_pruned && !s.degenerate && opts.positions.as_ref().is_none_or(|p| p.contains(&s.position))
}

/// Computes the scores the choice needs (or all of them), then chooses. `scores` holds every candidate
/// in the paper's order (position outer, layer inner) with `norm` and `degenerate` set and no scores;
/// `layers` is the model's layer count.
pub fn select(scores: &mut [Scored], layers: usize, opts: &SelectOptions, eval: &mut dyn Evaluate) -> Result<Choice> {
    let first_pruned = opts.first_pruned(layers);
    let in_scope: Vec<usize> = (0..scores.len())
        .filter(|&i| {
            let s = &scores[i];
            opts.all_scores
                || (s.layer < first_pruned && opts.positions.as_ref().is_none_or(|p| p.contains(&s.position)))
        })
        .collect();
    // Induce first (the cheap score: prefix reuse), then KL only where it can matter: a candidate below the
    // induce threshold fails the filter and is not eligible for the KL fallback whatever its KL (method.md
    // §5 item 2, applied to KL as to bypass). The relaxation and the no-candidate error ask for the rest.
    eval.plan(ScoreKind::Induce, in_scope.len());
    for &i in &in_scope {
        scores[i].induce = Some(eval.induce(i)?);
    }
    let need_kl: Vec<usize> = in_scope
        .iter()
        .copied()
        .filter(|&i| opts.all_scores || scores[i].induce.is_some_and(|v| v >= opts.min_induce))
        .collect();
    eval.plan(ScoreKind::Kl, need_kl.len());
    for &i in &need_kl {
        scores[i].kl = Some(eval.kl(i)?);
    }
    // Bypass only where it can matter (method.md §5 item 2), unless every score is asked for.
    let need_bypass: Vec<usize> = in_scope
        .iter()
        .copied()
        .filter(|&i| opts.all_scores || (scores[i].kl.is_some() && rejection(&scores[i], opts, first_pruned).is_none()))
        .collect();
    eval.plan(ScoreKind::Bypass, need_bypass.len());
    for &i in &need_bypass {
        scores[i].bypass = Some(eval.bypass(i)?);
    }
    // The fallbacks need bypass scores for their tie-breaks and relaxed rule, and the choice its own; the
    // relaxation and the no-candidate error the KL of every allowed candidate.
    let choice = loop {
        let missing = match choose(scores, layers, opts) {
            Err(m) => m,
            Ok(Some(c)) if scores[c.index].bypass.is_none() => Missing { kl: Vec::new(), bypass: vec![c.index] },
            Ok(c) => break c,
        };
        if !missing.kl.is_empty() {
            eval.plan(ScoreKind::Kl, missing.kl.len());
            for &i in &missing.kl {
                scores[i].kl = Some(eval.kl(i)?);
            }
        }
        if !missing.bypass.is_empty() {
            eval.plan(ScoreKind::Bypass, missing.bypass.len());
            for &i in &missing.bypass {
                scores[i].bypass = Some(eval.bypass(i)?);
            }
        }
    };
    for s in scores.iter_mut() {
        s.rejected = rejection(s, opts, first_pruned);
    }
    choice.ok_or_else(|| no_candidate(scores, opts, first_pruned))
}

/// Scores [`choose`] needs but that were not computed (candidate indices).
#[derive(Debug, Default, PartialEq)]
pub struct Missing {
    pub kl: Vec<usize>,
    pub bypass: Vec<usize>,
}

impl Missing {
    fn bypass(ids: Vec<usize>) -> Missing {
        Missing { kl: Vec::new(), bypass: ids }
    }
}

fn no_candidate(scores: &[Scored], opts: &SelectOptions, first_pruned: usize) -> FindError {
    // The induce scores decide this (every allowed candidate is below the threshold), and they are always
    // computed; KL is not computed below the threshold (method.md §5 item 2), so it is not listed.
    let mut best: Vec<&Scored> =
        scores.iter().filter(|s| allowed(s, opts, first_pruned) && s.induce.is_some_and(|v| !v.is_nan())).collect();
    best.sort_by(|a, b| b.induce.unwrap_or(f64::NEG_INFINITY).total_cmp(&a.induce.unwrap_or(f64::NEG_INFINITY)));
    let list: Vec<String> = best
        .iter()
        .take(5)
        .map(|s| format!("({}, {}) induce {:.3}", s.position, s.layer, s.induce.unwrap_or(f64::NAN)))
        .collect();
    FindError::NoCandidate(format!(
        "no candidate can be chosen: none passes the filter (KL <= {}, induce >= {}, layer < {first_pruned}) and none \
         with an allowed layer has induce >= {}; the highest induce scores: {}. Activation addition of these \
         candidates does not make the model refuse harmless prompts: try other or more prompts, check the refusal \
         token, or pass --relax-induce (smallest bypass among candidates with KL <= {}; it scores every candidate's KL)",
        opts.kl_max,
        opts.min_induce,
        opts.min_induce,
        if list.is_empty() { "none".to_string() } else { list.join("; ") },
        opts.kl_max
    ))
}

/// Orders by value ascending, then by iteration order (the candidates' index).
fn best_by(scores: &[Scored], eligible: impl Iterator<Item = usize>, key: impl Fn(&Scored) -> f64) -> Vec<usize> {
    let mut v: Vec<usize> = eligible.collect();
    v.sort_by(|&a, &b| key(&scores[a]).total_cmp(&key(&scores[b])).then(a.cmp(&b)));
    v
}

/// The choice from computed scores (method.md §5 and its fallbacks). `Err(Missing)` lists bypass
/// scores it needs first; `Ok(None)`: nothing can be chosen.
pub fn choose(scores: &[Scored], layers: usize, opts: &SelectOptions) -> std::result::Result<Option<Choice>, Missing> {
    let first_pruned = opts.first_pruned(layers);
    // Every allowed candidate at or above the induce threshold can pass the filter or be the fallback's
    // choice: it needs its KL (the shortcuts skip KL only below the threshold).
    let no_kl: Vec<usize> = (0..scores.len())
        .filter(|&i| {
            let s = &scores[i];
            allowed(s, opts, first_pruned) && s.induce.is_some_and(|v| v >= opts.min_induce) && s.kl.is_none()
        })
        .collect();
    if !no_kl.is_empty() {
        return Err(Missing { kl: no_kl, bypass: Vec::new() });
    }
    let pass: Vec<usize> = (0..scores.len())
        .filter(|&i| {
            let s = &scores[i];
            s.kl.is_some() && s.induce.is_some() && rejection(s, opts, first_pruned).is_none()
        })
        .collect();
    let missing: Vec<usize> = pass.iter().copied().filter(|&i| scores[i].bypass.is_none()).collect();
    if !missing.is_empty() {
        return Err(Missing::bypass(missing));
    }
    let bypass = |s: &Scored| s.bypass.expect("checked above");
    let kl = |s: &Scored| s.kl.expect("eligible candidates have a KL score");
    let margins = |chosen: usize, rule_key: &dyn Fn(&Scored) -> f64, others: &[usize]| {
        let runner_up = others.iter().find(|&&i| i != chosen).map(|&i| Near {
            position: scores[i].position,
            layer: scores[i].layer,
            value: rule_key(&scores[i]),
            gap: rule_key(&scores[i]) - rule_key(&scores[chosen]),
        });
        closest(scores, opts, first_pruned, runner_up)
    };
    let done = |index: usize, rule: Rule, margins: Margins| Choice {
        index,
        position: scores[index].position,
        layer: scores[index].layer,
        rule,
        margins,
    };
    if !pass.is_empty() {
        let order = best_by(scores, pass.iter().copied(), bypass);
        let m = margins(order[0], &bypass, &order);
        return Ok(Some(done(order[0], Rule::Filter, m)));
    }
    // Fallback: allowed layer, induce at or above the threshold, not degenerate; smallest KL, ties by
    // bypass, then iteration order.
    let eligible: Vec<usize> = (0..scores.len())
        .filter(|&i| {
            let s = &scores[i];
            allowed(s, opts, first_pruned)
                && s.kl.is_some_and(|k| !k.is_nan())
                && s.induce.is_some_and(|v| !v.is_nan() && v >= opts.min_induce)
        })
        .collect();
    if !eligible.is_empty() {
        let order = best_by(scores, eligible.iter().copied(), kl);
        let min = kl(&scores[order[0]]);
        let tied: Vec<usize> = order.iter().copied().filter(|&i| kl(&scores[i]) == min).collect();
        let missing: Vec<usize> = tied.iter().copied().filter(|&i| scores[i].bypass.is_none()).collect();
        if tied.len() > 1 && !missing.is_empty() {
            return Err(Missing::bypass(missing));
        }
        let mut order = order;
        order.sort_by(|&a, &b| {
            kl(&scores[a])
                .total_cmp(&kl(&scores[b]))
                .then(scores[a].bypass.unwrap_or(f64::INFINITY).total_cmp(&scores[b].bypass.unwrap_or(f64::INFINITY)))
                .then(a.cmp(&b))
        });
        let m = margins(order[0], &kl, &order);
        return Ok(Some(done(order[0], Rule::MinKl { threshold: min }, m)));
    }
    if opts.relax_induce {
        // The relaxation needs the KL of every allowed candidate.
        let no_kl: Vec<usize> = (0..scores.len())
            .filter(|&i| {
                allowed(&scores[i], opts, first_pruned) && scores[i].induce.is_some() && scores[i].kl.is_none()
            })
            .collect();
        if !no_kl.is_empty() {
            return Err(Missing { kl: no_kl, bypass: Vec::new() });
        }
        let relaxed: Vec<usize> = (0..scores.len())
            .filter(|&i| {
                let s = &scores[i];
                allowed(s, opts, first_pruned) && s.kl.is_some_and(|k| k <= opts.kl_max)
            })
            .collect();
        if !relaxed.is_empty() {
            let missing: Vec<usize> = relaxed.iter().copied().filter(|&i| scores[i].bypass.is_none()).collect();
            if !missing.is_empty() {
                return Err(Missing::bypass(missing));
            }
            let order = best_by(scores, relaxed.iter().copied(), bypass);
            let m = margins(order[0], &bypass, &order);
            return Ok(Some(done(order[0], Rule::RelaxedBypass, m)));
        }
        let any: Vec<usize> = (0..scores.len())
            .filter(|&i| allowed(&scores[i], opts, first_pruned) && scores[i].kl.is_some_and(|k| !k.is_nan()))
            .collect();
        if !any.is_empty() {
            let order = best_by(scores, any.iter().copied(), kl);
            let m = margins(order[0], &kl, &order);
            return Ok(Some(done(order[0], Rule::RelaxedMinKl, m)));
        }
    }
    Ok(None)
}

/// The margins to the filter's thresholds among allowed candidates.
fn closest(scores: &[Scored], opts: &SelectOptions, first_pruned: usize, runner_up: Option<Near>) -> Margins {
    let near = |s: &Scored, value: f64, gap: f64| Near { position: s.position, layer: s.layer, value, gap };
    let ok = |s: &&Scored| allowed(s, opts, first_pruned) && !nan(s.kl) && !nan(s.induce);
    let closest_above_kl = scores
        .iter()
        .filter(ok)
        .filter(|s| s.induce.is_some_and(|v| v >= opts.min_induce) && s.kl.is_some_and(|k| k > opts.kl_max))
        .map(|s| near(s, s.kl.expect("filtered"), s.kl.expect("filtered") - opts.kl_max))
        .min_by(|a, b| a.gap.total_cmp(&b.gap));
    let closest_below_induce = scores
        .iter()
        .filter(ok)
        .filter(|s| s.induce.is_some_and(|v| v < opts.min_induce))
        .map(|s| near(s, s.induce.expect("filtered"), opts.min_induce - s.induce.expect("filtered")))
        .min_by(|a, b| a.gap.total_cmp(&b.gap));
    Margins { runner_up, closest_above_kl, closest_below_induce }
}

#[cfg(test)]
mod tests;
