//! `find` with its embedded default prompts on the real models: on the refusing SmolLM2 it stops at the
//! paper's induce filter (what was measured, and what issue 11 asks instead, is in the test), and on the
//! base SmolLM2, which barely refuses, it stops with the clear message instead of producing a direction.
//! Skips, saying so, where `../shared` is absent.

use chat::Chat;
use find::{Options, Sets};
use model::Model;

#[test]
fn the_embedded_prompts_on_the_refusing_model_stop_at_the_induce_filter() {
    // Issue 11 asks that the embedded prompts find a direction whose ablation brings the mean refusal score
    // of the harmful validation prompts below zero and whose edit refuses fewer than 20% of
    // `splits/harmful_val.json`. Measured: on the refusing SmolLM2 they do not get that far. The refusal
    // token detected is the paper's "I" and the filter keeps enough prompts, but no allowed candidate's activation
    // addition raises the mean refusal score of the embedded harmless validation prompts to 0 (the paper's
    // induce filter; with the reference's prompts 8 candidates reach it, all at position -1, layers 16-23),
    // so neither the paper's rule nor the KL fallback of method.md §5 can choose, and `find` stops with the
    // error below instead of picking a direction silently. When the embedded sets change so that a
    // direction is found, this test must become the acceptance test above (ablation, then `edit` and the
    // substring judge on `splits/harmful_val.json`, greedy, 64 tokens).
    let Some(model_dir) = testutil::smollm2_refusal() else { return };
    let (model, chat) = (Model::open(&model_dir).unwrap(), Chat::load(&model_dir).unwrap());
    let e = find::find(&model, &chat, &Sets::embedded(), &Options::default(), &find::NoProgress).unwrap_err();
    eprintln!("embedded prompts on the refusing model: {e}");
    let e = e.to_string();
    assert!(
        e.starts_with(
            "no candidate can be chosen: none passes the filter (KL <= 0.1, induce >= 0, layer < 24) and none with an \
             allowed layer has induce >= 0; the highest induce scores: "
        ),
        "{e}"
    );
    assert!(e.contains("pass --relax-induce"), "{e}");
    assert!(e.contains("(refusal token \"I\" = 57, detected; kept after filtering: harmful_train "), "{e}");
}

#[test]
fn a_model_that_barely_refuses_stops_with_what_was_measured() {
    let Some(model_dir) = testutil::smollm2() else { return };
    let (model, chat) = (Model::open(&model_dir).unwrap(), Chat::load(&model_dir).unwrap());
    // The paper's refusal token for SmolLM2 (method.md §3): "I" = 57, as the reference used.
    let opts = Options { refusal_tokens: Some(vec![57]), ..Options::default() };
    let e = find::find(&model, &chat, &Sets::embedded(), &opts, &find::NoProgress).unwrap_err().to_string();
    eprintln!("base model: {e}");
    assert!(e.starts_with("the model barely refuses: only "), "{e}");
    assert!(
        e.contains(
            "of its 128 sampled harmful training prompts get a positive refusal score (refusal token \"I\" = 57"
        ),
        "{e}"
    );
    // Detected, the refusal token either is not found or the filter stops it the same way.
    let e =
        find::find(&model, &chat, &Sets::embedded(), &Options::default(), &find::NoProgress).unwrap_err().to_string();
    eprintln!("base model, detection: {e}");
    assert!(e.starts_with("the model barely refuses") || e.starts_with("no first token is much likelier"), "{e}");
}
