//! The equivalence check on the real refusing model (`../shared/models/build-smollm2-refusal.sh`) with the
//! paper's direction for it (`../shared/reference/direction.safetensors`, layer 22), on the reference's
//! protocol: the first 16 prompts of `harmless_test` in the model's template, unpadded, the residual entering
//! every layer and the final residual (`../shared/reference/eval.json`, `equivalence`: 4.36e-6 for the
//! untied f32 edit).
//!
//! - f32 (the reference's setting: an exact f32 copy of the model, edited): the untied edit equals the hooks
//!   to <= 1e-4 at every layer (issue 12's bar), and so do its logits; `--keep-tie` keeps the residual
//!   streams but not the logits.
//! - bf16 (the model as built, what `abliterate run` edits by default): the rounding of the edited weights to
//!   bf16 dominates the difference; what the checkpoint still writes along r̂ stays at bf16's floor.
//!
//! Skips (saying so) where `../shared` is absent.

use std::path::{Path, PathBuf};

use checkpoint::Checkpoint;
use edit::{Direction, NoProgress, Options, WriteOptions};
use model::Model;
use verify::{Caveat, EditRecord, Equivalence};

fn edit(model: &Path, direction: &Direction, out: &Path, opts: &Options) {
    let ckpt = Checkpoint::open(model).unwrap();
    let plan = edit::plan(&ckpt, opts).unwrap();
    edit::write(&ckpt, &plan, direction, out, &WriteOptions { force: true }, &NoProgress).unwrap();
}

fn prompts(model: &Path, shared: &Path) -> Vec<Vec<u32>> {
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared.join("reference/prompts.json")).unwrap()).unwrap();
    let chat = chat::Chat::load(model).unwrap();
    p["harmless_test"].as_array().unwrap()[..16]
        .iter()
        .map(|t| chat.prompt_ids(t.as_str().unwrap(), None).unwrap())
        .collect()
}

fn check(
    original: &Path,
    edited: &Path,
    direction: &Direction,
    prompts: &[Vec<u32>],
    what: &str,
) -> (EditRecord, Equivalence) {
    let record = EditRecord::read(edited).unwrap().unwrap();
    let (a, b) = (Model::open(original).unwrap(), Model::open(edited).unwrap());
    let mut hooks = record.claim.hooks(a.arch().layers, &direction.values).unwrap();
    let e = verify::equivalence(&a, &b, &mut hooks, true, prompts, 8, &mut |_| {}).unwrap();
    let top = |v: &Option<Vec<f64>>| v.as_ref().unwrap().iter().copied().fold(0f64, f64::max);
    eprintln!(
        "{what}: max {:.3e} at layer {}, along r̂ {:.3e}, besides r̂ {:.3e}; logits rel {:.3e}, max |Δ| {:.3e}, \
         top-1 {}/{}",
        e.max,
        e.worst_layer,
        top(&e.along_direction),
        top(&e.besides_direction),
        e.logits_rel,
        e.logits_max_abs,
        e.top1_agree,
        e.prompts
    );
    eprintln!("{what} per layer: {:?}", e.per_layer.iter().map(|v| format!("{v:.2e}")).collect::<Vec<_>>());
    (record, e)
}

#[test]
fn real_model_edit_equals_ablation_in_f32_and_bf16_rounding_is_measured() {
    let (Some(bf16), Some(shared)) = (testutil::smollm2_refusal(), testutil::shared()) else {
        eprintln!("skipping real_model_edit_equals_ablation: ../shared is absent");
        return;
    };
    let f32 = testutil::f32_copy(&bf16, "smollm2-135m-refusal-f32");
    let d = Direction::load(&shared.join("reference/direction.safetensors"), 576).unwrap();
    let prompts = prompts(&bf16, &shared);
    let tmp = tempfile::tempdir().unwrap();
    let out = |n: &str| -> PathBuf { tmp.path().join(n) };

    edit(&f32, &d, &out("f32"), &Options::default());
    let (record, e) = check(&f32, &out("f32"), &d, &prompts, "f32 untied");
    assert!(record.exact(), "{:?}", record.caveats);
    assert!(e.per_layer.iter().all(|&v| v <= 1e-4), "issue 12: <= 1e-4 at every layer: {e:?}");
    assert!(e.logits_rel <= 1e-4 && e.top1_agree == 16, "{e:?}");

    edit(&f32, &d, &out("f32-tied"), &Options { keep_tie: true, ..Options::default() });
    let (record, tied) = check(&f32, &out("f32-tied"), &d, &prompts, "f32 --keep-tie");
    assert_eq!(record.caveats, vec![Caveat::KeptTie]);
    assert!(tied.per_layer.iter().all(|&v| v <= 1e-4), "the residual stream is the same: {tied:?}");
    // The reference measured logits up to 0.88 apart for its tied edit.
    assert!(tied.logits_max_abs > 0.1 && tied.logits_rel > 100.0 * e.logits_rel, "{tied:?}");

    edit(&bf16, &d, &out("bf16"), &Options::default());
    let (record, e) = check(&bf16, &out("bf16"), &d, &prompts, "bf16 untied");
    assert_eq!(record.caveats, vec![Caveat::Rounding { dtype: "bf16".into(), unit_roundoff: 2f64.powi(-8) }]);
    let along = e.along_direction.as_ref().unwrap();
    let besides = e.besides_direction.as_ref().unwrap();
    // Most of the difference is the rounding of every edited weight, there with the hooks on both sides too.
    assert!(besides.iter().zip(&e.per_layer).all(|(b, w)| *b >= 0.5 * w), "{e:?}");
    // What the checkpoint writes along r̂: each writer keeps |r̂ᵀW'| ≈ 1.1e-4 ||W||_F after rounding
    // (docs/results.md); through 30 layers that stays within a few 1e-4.
    assert!(along.iter().all(|&v| v <= 2e-3), "{e:?}");
}
