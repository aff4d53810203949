//! `find` against the paper's own code on the refusing SmolLM2 (`../shared/reference/`, README there): with
//! exactly the reference's sampled prompt lists, the refusal token is detected as "I" (57), the filter
//! keeps the same prompts, every candidate points the same way (cosine >= 0.9999), every score computed is within
//! method.md §5's tolerances, and the choice is the reference's (-1, 22) by the KL fallback, with margins
//! that show it does not hinge on the last digits. Skips, saying so, where `../shared` is absent.

use std::path::Path;

use chat::Chat;
use direction::Candidates;
use eval::{Prompt, PromptSet};
use find::{Options, Rule, Sets};
use model::Model;
use serde_json::Value;

/// method.md §5: refusal scores within 2e-2 absolute; KL within 5e-3 absolute or 5%.
const REFUSAL_TOL: f64 = 2e-2;
const KL_ABS: f64 = 5e-3;
const KL_REL: f64 = 0.05;

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn set(prompts: &Value, key: &str) -> PromptSet {
    let list = strings(&prompts[key]);
    PromptSet {
        prompts: list.iter().map(|s| Prompt::new(s)).collect(),
        source: format!("reference:{key}"),
        sha256: String::new(),
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (direction::norm(a) * direction::norm(b))
}

#[test]
fn find_reproduces_the_reference_run_on_the_refusing_model() {
    let Some(model_dir) = testutil::smollm2_refusal() else { return };
    let shared = testutil::shared().expect("the model was built from ../shared");
    let reference = shared.join("reference");
    let prompts = json(&reference.join("prompts.json"));
    let want = json(&reference.join("scores.json"));
    let (model, chat) = (Model::open(&model_dir).unwrap(), Chat::load(&model_dir).unwrap());
    let sets = Sets {
        harmful_train: set(&prompts, "harmful_train"),
        harmless_train: set(&prompts, "harmless_train"),
        harmful_val: set(&prompts, "harmful_val"),
        harmless_val: set(&prompts, "harmless_val"),
    };
    // The lists are the reference's draws already (128 and 32 each): used whole, in order. The exact
    // shortcuts of method.md §5 (pruned layers, induce first, KL and bypass only where they can matter,
    // the shared baseline and induce prefix, last-position logits) keep this test to a few CPU minutes;
    // the scores they compute are checked, and `cargo xtask bench find --all-scores` runs all 180 x 3.
    let opts = Options::default();
    let found = find::find(&model, &chat, &sets, &opts, &find::NoProgress).unwrap();

    // The template, the post-instruction tokens and the refusal token, detected on its own.
    assert_eq!(found.template, prompts["template"].as_str().unwrap());
    let eoi: Vec<u32> =
        prompts["eoi_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(found.post_instruction, eoi);
    assert!(found.refusal.detected.is_some());
    assert_eq!(found.refusal.ids, vec![57], "refusal tokens {:?}", found.refusal.texts);

    // The same filtered lists.
    for (name, _) in found.sampled.as_array() {
        assert_eq!(found.filtered(name), strings(&prompts[format!("{name}_filtered")]), "{name} after filtering");
    }

    // Every candidate points the same way as the reference's.
    let cands = Candidates::load(&reference.join("candidates.safetensors"), found.hidden).unwrap();
    assert_eq!(cands.positions(), found.positions.as_slice());
    let mut worst_cos = 1f64;
    for (pi, &position) in found.positions.iter().enumerate() {
        for layer in 0..found.layers {
            let ours = found.candidate(pi, layer);
            let theirs = cands.get(direction::Candidate { position, layer }).unwrap();
            let s = &found.scores[pi * found.layers + layer];
            if layer == 0 {
                // method.md §4: the same template token at every prompt; exactly zero here (sums divided
                // once), float64 noise of 1e-16 in the reference.
                assert!(s.degenerate && direction::norm(ours) == 0.0 && direction::norm(theirs) < 1e-12);
                continue;
            }
            let c = cosine(ours, theirs);
            worst_cos = worst_cos.min(c);
            assert!(c >= 0.9999, "candidate ({position}, {layer}): cosine {c}");
        }
    }

    // Every score computed within method.md §5's tolerances (the others are reported as not computed).
    let rows = want["candidates"].as_array().unwrap();
    assert_eq!(rows.len(), found.scores.len());
    let (mut worst_refusal, mut worst_kl, mut worst_kl_abs, mut counts) = (0f64, 0f64, 0f64, [0usize; 3]);
    for (s, r) in found.scores.iter().zip(rows) {
        assert_eq!((s.position, s.layer as u64), (r["position"].as_i64().unwrap(), r["layer"].as_u64().unwrap()));
        for (k, (ours, key)) in [(s.bypass, "bypass_score"), (s.induce, "induce_score")].into_iter().enumerate() {
            let Some(ours) = ours else { continue };
            counts[k] += 1;
            let d = (ours - r[key].as_f64().unwrap()).abs();
            worst_refusal = worst_refusal.max(d);
            assert!(d <= REFUSAL_TOL, "({}, {}) {key}: {ours} vs {}", s.position, s.layer, r[key]);
        }
        let Some(ours) = s.kl else { continue };
        counts[2] += 1;
        let theirs = r["kl_score"].as_f64().unwrap();
        let d = (ours - theirs).abs();
        worst_kl = worst_kl.max(d / KL_ABS.max(KL_REL * theirs.abs()));
        worst_kl_abs = worst_kl_abs.max(d);
        assert!(d <= KL_ABS || d <= KL_REL * theirs.abs(), "({}, {}) kl: {ours} vs {theirs}", s.position, s.layer);
    }
    // What the shortcuts compute here: induce for the 138 allowed non-zero candidates (and the 6 zero ones
    // from the baseline), KL for the 8 at or above the induce threshold, bypass for the choice.
    let [bypass_n, induce_n, kl_n] = counts;
    assert_eq!((induce_n, kl_n), (144, 8), "scores computed");
    assert!(bypass_n >= 1);
    let base = &want["baseline_refusal_score"];
    assert!((found.baseline_harmful_val - base["harmful_val"].as_f64().unwrap()).abs() <= REFUSAL_TOL);
    assert!((found.baseline_harmless_val - base["harmless_val"].as_f64().unwrap()).abs() <= REFUSAL_TOL);

    // The same choice, by the fallback: nothing passes the paper's filter.
    let c = &found.choice;
    assert_eq!((c.position, c.layer), (-1, 22));
    assert!(matches!(c.rule, Rule::MinKl { .. }), "{:?}", c.rule);
    // The choice does not hinge on the last digits: the runner-up by KL is further away than any score
    // can move; the candidates that could pass the filter within tolerance are the chosen one alone
    // (passing, it would be the paper's choice too); no low-KL candidate is near a non-negative induce.
    let runner_up = c.margins.runner_up.as_ref().unwrap();
    assert!(runner_up.gap > 2.0 * KL_ABS.max(KL_REL * runner_up.value), "runner-up {runner_up:?}");
    let near: Vec<(i64, usize)> = found
        .scores
        .iter()
        .filter(|s| s.layer < found.select.first_pruned_layer && !s.degenerate)
        .filter(|s| s.induce.unwrap() >= -REFUSAL_TOL)
        .filter(|s| {
            let kl = s.kl.expect("KL is computed at or above the induce threshold");
            kl - KL_ABS.max(KL_REL * kl) <= 0.1
        })
        .map(|s| (s.position, s.layer))
        .collect();
    assert_eq!(near, vec![(-1, 22)]);
    let below = c.margins.closest_below_induce.as_ref().unwrap();
    assert!(below.gap > 2.0 * REFUSAL_TOL, "closest to a non-negative induce: {below:?}");

    eprintln!(
        "reference: choice ({}, {}) by {:?}; smallest cosine 1 - {:.1e}; worst |refusal score diff| {worst_refusal:.2e}; \
         worst |KL diff| {worst_kl_abs:.2e} ({worst_kl:.4} of its tolerance); computed: {induce_n} induce, {kl_n} KL, {bypass_n} bypass; runner-up {runner_up:?}; closest below induce {below:?}; timings {:?}",
        c.position,
        c.layer,
        c.rule,
        1.0 - worst_cos,
        found.timings
    );
}

#[test]
fn paper_sampling_draws_the_reference_lists_from_the_papers_splits() {
    let Some(shared) = testutil::shared() else {
        eprintln!("skipping: ../shared is absent, so the paper's splits and the reference lists are not here");
        return;
    };
    let splits = shared.join("datasets/refusal_direction/splits");
    let read = |name: &str| eval::prompts::read(&splits.join(format!("{name}.json"))).unwrap();
    let sets = Sets {
        harmful_train: read("harmful_train"),
        harmless_train: read("harmless_train"),
        harmful_val: read("harmful_val"),
        harmless_val: read("harmless_val"),
    };
    let drawn = find::sample(&sets, 128, 32, find::Sampling::Paper).unwrap();
    let prompts = json(&shared.join("reference/prompts.json"));
    for (name, list) in drawn.as_array() {
        let got: Vec<String> = list.iter().map(|p| p.instruction.clone()).collect();
        assert_eq!(got, strings(&prompts[name]), "{name}");
    }
}
