//! `report.md` and `scores.json`: what a run found, for people and for machines. Prompts appear as
//! instructions only (inputs), never with model completions.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::output::Meta;
use crate::plot::Chart;
use crate::select::{Near, Rule, Scored};
use crate::{Found, Lists};

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".to_string(), |v| format!("{v:.digits$}"))
}

fn near(n: &Option<Near>, what: &str) -> String {
    match n {
        Some(n) => format!("{what} ({}, {}) at {:.4}, a margin of {:.4}", n.position, n.layer, n.value, n.gap),
        None => format!("{what}: none"),
    }
}

fn counts(found: &Found) -> Lists<(usize, usize)> {
    let c = |k: &[usize], s: &[f32]| (k.len(), s.len());
    Lists {
        harmful_train: c(&found.kept.harmful_train, &found.filter_scores.harmful_train),
        harmless_train: c(&found.kept.harmless_train, &found.filter_scores.harmless_train),
        harmful_val: c(&found.kept.harmful_val, &found.filter_scores.harmful_val),
        harmless_val: c(&found.kept.harmless_val, &found.filter_scores.harmless_val),
    }
}

/// The token at a candidate position.
pub fn token_at(found: &Found, position: i64) -> String {
    let i = found.positions.iter().position(|&p| p == position).unwrap_or(0);
    found.post_instruction_text.get(i).cloned().unwrap_or_default()
}

/// `scores.json`.
pub fn scores_json(found: &Found, meta: &Meta) -> Value {
    let c = found.chosen();
    let counts = counts(found);
    json!({
        "tool": "abliterate find",
        "version": meta.version,
        "model": {"dir": meta.model_dir, "sha256": meta.model_sha256},
        "choice": {
            "position": c.position,
            "layer": c.layer,
            "token": token_at(found, c.position),
            "bypass_score": c.bypass,
            "induce_score": c.induce,
            "kl_score": c.kl,
            "norm": c.norm,
            "rule": found.choice.rule,
            "rule_text": found.choice.rule.describe(),
            "fallback_used": found.choice.rule != Rule::Filter,
            "margins": found.choice.margins,
        },
        "selection": found.select,
        "refusal_tokens": found.refusal,
        "template": found.template,
        "system": found.system,
        "effective_system": found.effective_system,
        "post_instruction": {"ids": found.post_instruction, "text": found.post_instruction_text, "positions": found.positions},
        "sampling": found.sampling,
        "n_train": found.n_train,
        "n_val": found.n_val,
        "sets": found.sets,
        "counts": {
            "harmful_train": {"sampled": counts.harmful_train.1, "kept": counts.harmful_train.0},
            "harmless_train": {"sampled": counts.harmless_train.1, "kept": counts.harmless_train.0},
            "harmful_val": {"sampled": counts.harmful_val.1, "kept": counts.harmful_val.0},
            "harmless_val": {"sampled": counts.harmless_val.1, "kept": counts.harmless_val.0},
        },
        "baseline_refusal_score": {"harmful_val": found.baseline_harmful_val, "harmless_val": found.baseline_harmless_val},
        "shared_prefix_tokens": found.shared_prefix_tokens,
        "candidates": found.scores,
        "timings": found.timings,
        "sampled": found.sampled,
        "filter_scores": found.filter_scores,
        "kept": found.kept,
    })
}

fn row(s: &Scored) -> String {
    format!(
        "| ({}, {}) | {:.3} | {} | {} | {} | {} |",
        s.position,
        s.layer,
        s.norm,
        f(s.bypass, 4),
        f(s.induce, 4),
        f(s.kl, 4),
        s.rejected.as_deref().unwrap_or("passes")
    )
}

/// `report.md`.
pub fn markdown(found: &Found, meta: &Meta) -> String {
    let c = found.chosen();
    let mut o = String::new();
    let _ = writeln!(o, "# Refusal direction of `{}`\n", meta.model_dir);
    let _ = writeln!(
        o,
        "Chosen: **position {} ({:?}), layer {} of {}** (the residual stream entering layer {}), norm {:.4}.\n",
        c.position,
        token_at(found, c.position),
        c.layer,
        found.layers,
        c.layer,
        c.norm
    );
    let _ = writeln!(o, "| score | chosen | no intervention |\n|---|---:|---:|");
    let _ = writeln!(
        o,
        "| bypass: mean refusal score of harmful_val under directional ablation | {} | {:.4} |",
        f(c.bypass, 4),
        found.baseline_harmful_val
    );
    let _ = writeln!(
        o,
        "| induce: mean refusal score of harmless_val under activation addition | {} | {:.4} |",
        f(c.induce, 4),
        found.baseline_harmless_val
    );
    let _ = writeln!(o, "| KL: first-token KL(baseline ‖ ablated) on harmless_val | {} | 0 |\n", f(c.kl, 5));
    let _ = writeln!(o, "Rule: {}.\n", found.choice.rule.describe());
    let m = &found.choice.margins;
    let _ = writeln!(o, "How close the choice came to being different:\n");
    let _ = writeln!(o, "- {}", near(&m.runner_up, "runner-up under that rule"));
    let _ = writeln!(o, "- {}", near(&m.closest_above_kl, "closest to passing the KL threshold"));
    let _ = writeln!(o, "- {}\n", near(&m.closest_below_induce, "closest to passing the induce threshold"));

    let _ = writeln!(o, "## Prompts\n");
    let counts = counts(found);
    let _ =
        writeln!(o, "| set | source | sha256 | size | sampled | kept by the filter |\n|---|---|---|---:|---:|---:|");
    for ((name, info), (_, (kept, sampled))) in found.sets.as_array().into_iter().zip(counts.as_array()) {
        let _ = writeln!(
            o,
            "| {name} | `{}` | `{}` | {} | {sampled} | {kept} |",
            info.source,
            &info.sha256[..12.min(info.sha256.len())],
            info.size
        );
    }
    let sampling = match found.sampling {
        crate::Sampling::Paper => {
            "the paper's draws (CPython random.seed(42), random.sample in the paper's order)".to_string()
        }
        crate::Sampling::Seed { seed } => format!("CPython random.seed({seed}), random.sample in the paper's order"),
    };
    let _ = writeln!(
        o,
        "\nSampling: {sampling}; {} training and {} validation prompts per set.",
        found.n_train, found.n_val
    );
    let _ = writeln!(
        o,
        "Filter (method.md §2): harmful prompts kept when their refusal score is > 0, harmless ones when < 0.\n"
    );
    let _ = writeln!(
        o,
        "Prompt template (system prompt: {}):\n",
        match &found.effective_system {
            Some(s) => format!("{s:?}"),
            None => "none".to_string(),
        }
    );
    let _ = writeln!(o, "```\n{}\n```\n", found.template);
    let _ = writeln!(
        o,
        "Post-instruction tokens (candidate positions {}..-1): {}\n",
        found.positions.first().copied().unwrap_or(-1),
        found
            .post_instruction
            .iter()
            .zip(&found.post_instruction_text)
            .map(|(i, t)| format!("`{t:?}` ({i})"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(o, "## Refusal tokens\n");
    let ids: Vec<String> =
        found.refusal.ids.iter().zip(&found.refusal.texts).map(|(i, t)| format!("{t:?} = {i}")).collect();
    match &found.refusal.detected {
        None => {
            let _ = writeln!(o, "{} (given with --refusal-token).\n", ids.join(", "));
        }
        Some(d) => {
            let _ = writeln!(
                o,
                "{}, detected from the model: the first tokens whose mean probability rises most from the {} harmless to \
                 the {} harmful training prompts.\n",
                ids.join(", "),
                d.n_harmless,
                d.n_harmful
            );
            let _ = writeln!(o, "| token | id | after harmful | after harmless |\n|---|---:|---:|---:|");
            for e in &d.top {
                let _ = writeln!(o, "| {:?} | {} | {:.4} | {:.4} |", e.text, e.id, e.p_harmful, e.p_harmless);
            }
            o.push('\n');
        }
    }

    let _ = writeln!(o, "## Candidates\n");
    let scored = found.scores.iter().filter(|s| s.kl.is_some()).count();
    let bypassed = found.scores.iter().filter(|s| s.bypass.is_some()).count();
    let _ = writeln!(
        o,
        "{} candidates ({} positions × {} layers); {} degenerate (norm ≤ 1e-6 × the largest). KL and induce computed \
         for {scored}, bypass for {bypassed}{}. Layers ≥ {} are pruned (int({} × {})).\n",
        found.scores.len(),
        found.positions.len(),
        found.layers,
        found.scores.iter().filter(|s| s.degenerate).count(),
        if found.select.all_scores {
            " (--all-scores)"
        } else {
            " (only where the choice needs it; --all-scores for every one)"
        },
        found.select.first_pruned_layer,
        found.layers,
        found.select.max_layer_fraction
    );
    let by_kl = matches!(found.choice.rule, Rule::MinKl { .. } | Rule::RelaxedMinKl);
    let mut top: Vec<&Scored> = found
        .scores
        .iter()
        .filter(|s| s.layer < found.select.first_pruned_layer && !s.degenerate && s.kl.is_some())
        .collect();
    if by_kl {
        top.retain(|s| s.induce.is_some_and(|v| v >= found.select.min_induce));
        top.sort_by(|a, b| a.kl.unwrap_or(f64::INFINITY).total_cmp(&b.kl.unwrap_or(f64::INFINITY)));
        let _ = writeln!(o, "Allowed candidates with induce ≥ {}, by KL:\n", found.select.min_induce);
    } else {
        top.retain(|s| s.bypass.is_some());
        top.sort_by(|a, b| a.bypass.unwrap_or(f64::INFINITY).total_cmp(&b.bypass.unwrap_or(f64::INFINITY)));
        let _ = writeln!(o, "Allowed candidates with a bypass score, by bypass:\n");
    }
    let _ = writeln!(o, "| (position, layer) | norm | bypass | induce | KL | filter |\n|---|---:|---:|---:|---:|---|");
    for s in top.iter().take(10) {
        let _ = writeln!(o, "{}", row(s));
    }
    let _ = writeln!(o, "\nEvery candidate's scores are in `scores.json`.\n");
    for chart in Chart::ALL {
        let _ = writeln!(o, "![{}]({})\n", chart.file().trim_end_matches(".svg"), chart.file());
    }

    let _ = writeln!(o, "## Time\n");
    let _ = writeln!(o, "| stage | seconds | forward passes |\n|---|---:|---:|");
    for t in &found.timings {
        let _ = writeln!(o, "| {} | {:.1} | {} |", t.stage.name(), t.seconds, t.calls);
    }
    let _ = writeln!(
        o,
        "\nThe chat prefix all prompts share ({} tokens) is computed once per forward pass.\n",
        found.shared_prefix_tokens
    );
    let _ = writeln!(o, "abliterate {} · model sha256 `{}`", meta.version, meta.model_sha256);
    o
}
