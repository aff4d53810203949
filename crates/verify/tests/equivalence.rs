//! The equivalence check on the committed fixtures: every family's tiny checkpoint edited by `edit` (as
//! `abliterate edit` does it), then compared with the original under the hooks its manifest claims.
//! Where method.md §6-7 says the equivalence holds, the residual streams agree to f32 rounding; where it
//! says it cannot hold (`--keep-tie`, Gemma 2/3 post-norms, an excluded writer, bf16 storage), the check
//! must see it, and the manifest reader must say why.

use std::path::{Path, PathBuf};

use checkpoint::Checkpoint;
use edit::{Direction, LayerSet, NoProgress, Options, WriteOptions};
use model::Model;
use verify::{Caveat, EditRecord, Equivalence};

/// f32 runtime, f32 weights: what is left is the rounding of f32 arithmetic through two layers.
const F32_EXACT: f64 = 1e-5;

fn fixture(family: &str, dtype: &str) -> PathBuf {
    testutil::fixtures().join(format!("models/{family}/{dtype}"))
}

fn direction() -> PathBuf {
    testutil::fixtures().join("directions/llama.safetensors")
}

/// Edits a fixture into `tmp` with `opts`.
fn edit(tmp: &Path, family: &str, dtype: &str, opts: &Options) -> PathBuf {
    let ckpt = Checkpoint::open(&fixture(family, dtype)).unwrap();
    let dir = Direction::load(&direction(), ckpt.config.hidden_size).unwrap();
    let plan = edit::plan(&ckpt, opts).unwrap();
    let out = tmp.join(format!("{family}-{dtype}"));
    edit::write(&ckpt, &plan, &dir, &out, &WriteOptions { force: true }, &NoProgress).unwrap();
    out
}

/// Fixed prompts of 5, 9, 13 and 20 ids (every fixture has 512 ids).
fn prompts() -> Vec<Vec<u32>> {
    [5u32, 9, 13, 20].iter().map(|&n| (0..n).map(|i| (i * 37 + n * 11) % 500 + 3).collect()).collect()
}

fn check(family: &str, dtype: &str, opts: &Options) -> (EditRecord, Equivalence) {
    let tmp = tempfile::tempdir().unwrap();
    let out = edit(tmp.path(), family, dtype, opts);
    let record = EditRecord::read(&out).unwrap().expect("edit writes a manifest");
    let original = Model::open(&fixture(family, dtype)).unwrap();
    let edited = Model::open(&out).unwrap();
    let layers = original.arch().layers;
    let d = Direction::load(&direction(), original.arch().hidden).unwrap();
    assert_eq!(record.direction_sha256, d.sha256);
    let mut hooks = record.claim.hooks(layers, &d.values).unwrap();
    let split = record.claim.scale == 1.0;
    let e = verify::equivalence(&original, &edited, &mut hooks, split, &prompts(), 3, &mut |_| {}).unwrap();
    let top = |v: &Option<Vec<f64>>| v.as_ref().map(|v| v.iter().copied().fold(0f64, f64::max));
    eprintln!(
        "{family}/{dtype} {opts:?}: max {:.2e} (layer {}), besides r {:?}, along r {:?}, logits {:.2e}",
        e.max,
        e.worst_layer,
        top(&e.besides_direction),
        top(&e.along_direction),
        e.logits_rel
    );
    assert_eq!(e.besides_direction.is_some(), split);
    // The two parts bound the whole, position by position (triangle inequality), so also their maxima.
    if let (Some(b), Some(a)) = (&e.besides_direction, &e.along_direction) {
        for l in 0..=layers {
            assert!(e.per_layer[l] <= (b[l] + a[l]) * (1.0 + 1e-9), "{family} layer {l}: {e:?}");
        }
    }
    assert_eq!((e.prompts, e.tokens, e.per_layer.len()), (4, 47, layers + 1));
    (record, e)
}

#[test]
fn default_edits_equal_directional_ablation_in_f32() {
    for family in
        ["llama", "llama_bias", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"]
    {
        let (record, e) = check(family, "f32", &Options::default());
        assert!(record.exact(), "{family}: {:?}", record.caveats);
        assert!(record.claim.is_full(2), "{family}: {:?}", record.claim);
        assert!(e.max <= F32_EXACT, "{family}: {e:?}");
        assert!(e.logits_rel <= F32_EXACT, "{family}: {e:?}");
        assert_eq!(e.top1_agree, 4);
    }
}

#[test]
fn kept_tie_keeps_the_residual_stream_but_not_the_logits() {
    let (record, e) = check("llama", "f32", &Options { keep_tie: true, ..Options::default() });
    assert_eq!(record.caveats, vec![Caveat::KeptTie]);
    assert!(e.max <= F32_EXACT, "{e:?}");
    // The LM head lost each token's r̂ component: a rank-one change of the logits (method.md §6).
    assert!(e.logits_rel > 1e-3, "{e:?}");
}

#[test]
fn gemma2_and_gemma3_post_norms_break_the_equivalence() {
    for family in ["gemma2", "gemma3"] {
        let (record, e) = check(family, "f32", &Options::default());
        assert_eq!(record.caveats, vec![Caveat::GainWeighted { tensors: 4 }], "{family}");
        // The input of layer 0 is the edited embedding (exact); the first post-norm write differs.
        assert!(e.per_layer[0] <= F32_EXACT, "{family}: {e:?}");
        assert!(e.per_layer[1] > 1e-3, "{family}: {e:?}");
        // Not through any r̂ left in the writes (ŝ-orthogonal writes have no r̂ after the norm), but through
        // the norm rescaling what remains of each write.
        let along = e.along_direction.as_ref().unwrap();
        assert!(along.iter().all(|&v| v <= F32_EXACT), "{family}: {e:?}");
    }
}

#[test]
fn partial_and_scaled_edits_equal_hooks_on_the_writes_they_edited() {
    let opts = Options {
        scale: 0.5,
        layers: Some(LayerSet::parse("1").unwrap()),
        skip_embeddings: true,
        ..Options::default()
    };
    let (record, e) = check("llama", "f32", &opts);
    assert_eq!(record.claim, verify::Claim { scale: 0.5, embedding: false, layers: vec![1] });
    assert!(record.exact(), "{:?}", record.caveats);
    assert_eq!(e.per_layer[0], 0.0, "nothing was edited before layer 1: {e:?}");
    assert!(e.max <= F32_EXACT, "{e:?}");
    // Scaling by 2 reflects: still exactly the hooks with scale 2 on the writes.
    let (_, e) = check("mixtral", "f32", &Options { scale: 2.0, ..Options::default() });
    assert!(e.max <= F32_EXACT, "{e:?}");
}

#[test]
fn an_excluded_writer_still_writes_the_direction() {
    let opts = Options { exclude: vec!["*.o_proj.bias".into()], ..Options::default() };
    let (record, e) = check("llama_bias", "f32", &opts);
    let Caveat::Excluded { tensors } = &record.caveats[0] else { panic!("{:?}", record.caveats) };
    assert_eq!(tensors, &["model.layers.0.self_attn.o_proj.bias", "model.layers.1.self_attn.o_proj.bias"]);
    assert!(e.per_layer[1] > 1e-3, "{e:?}");
    assert!(e.along_direction.as_ref().unwrap()[1] > 1e-3, "the bias writes along r̂: {e:?}");
}

#[test]
fn bf16_storage_rounds_the_edit() {
    let (record, e) = check("llama", "bf16", &Options::default());
    assert_eq!(record.caveats, vec![Caveat::Rounding { dtype: "bf16".into(), unit_roundoff: 2f64.powi(-8) }]);
    // Rounding each edited weight once to bf16 moves it by up to half an ulp (up to 2^-8 relative) in every
    // direction: that is most of the difference, and it is there with the hooks on both sides too.
    assert!(e.max > 1e-4, "{e:?}");
    let (besides, along) = (e.besides_direction.as_ref().unwrap(), e.along_direction.as_ref().unwrap());
    for (l, (b, whole)) in besides.iter().zip(&e.per_layer).enumerate() {
        assert!(*b >= 0.5 * whole, "layer {l}: {e:?}");
    }
    // Along r̂ the rounded weights keep |r̂ᵀW'| of the order of u·|W|/√d: much less than the whole.
    assert!(along.iter().all(|&v| v < 0.25 * e.max), "{e:?}");
}

/// Prompts that start alike (a chat template's system turn) run their shared tokens once in each pass
/// and compare them once: the result is the maximum over the prompts checked one at a time, and the
/// positions counted are the prefix once plus each prompt's own.
#[test]
fn a_shared_prefix_is_compared_once_with_the_same_maxima() {
    let tmp = tempfile::tempdir().unwrap();
    let out = edit(tmp.path(), "llama", "bf16", &Options::default());
    let original = Model::open(&fixture("llama", "bf16")).unwrap();
    let edited = Model::open(&out).unwrap();
    let layers = original.arch().layers;
    let d = Direction::load(&direction(), original.arch().hidden).unwrap();
    let prefix: Vec<u32> = vec![7, 300, 41, 41, 9, 128];
    let prompts: Vec<Vec<u32>> = prompts().iter().map(|p| [&prefix[..], p].concat()).collect();
    let run = |ps: &[Vec<u32>]| {
        let mut hooks = model::Interventions::ablation(layers, &d.values).unwrap();
        verify::equivalence(&original, &edited, &mut hooks, true, ps, 3, &mut |_| {}).unwrap()
    };
    let all = run(&prompts);
    assert_eq!((all.prompts, all.tokens), (4, prefix.len() + 47));
    let singles: Vec<Equivalence> = prompts.iter().map(|p| run(std::slice::from_ref(p))).collect();
    let max_of = |f: &dyn Fn(&Equivalence) -> Vec<f64>| -> Vec<f64> {
        (0..=layers).map(|l| singles.iter().map(|e| f(e)[l]).fold(0f64, f64::max)).collect()
    };
    let close = |what: &str, got: &[f64], want: &[f64]| {
        for (l, (g, w)) in got.iter().zip(want).enumerate() {
            if model::batch_invariant() {
                assert_eq!(g, w, "{what}, layer {l}");
            } else {
                assert!((g - w).abs() <= 1e-6 * w.max(1e-3), "{what}, layer {l}: {g} vs {w}");
            }
        }
    };
    assert!(all.max > 1e-4, "bf16 rounding makes a difference to see: {all:?}");
    close("whole", &all.per_layer, &max_of(&|e| e.per_layer.clone()));
    close("besides", all.besides_direction.as_ref().unwrap(), &max_of(&|e| e.besides_direction.clone().unwrap()));
    close("along", all.along_direction.as_ref().unwrap(), &max_of(&|e| e.along_direction.clone().unwrap()));
    assert_eq!(all.top1_agree, singles.iter().map(|e| e.top1_agree).sum::<usize>());
}
