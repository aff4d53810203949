//! The hook side of every edit variant (docs/variants.md): an edited f32 fixture against the original run
//! with the hooks its plan describes ([`verify::equivalence::plan_hooks`]: [`edit::Plan::write_ops`] ->
//! `model::Interventions::project_basis` at each edited write; what `optimize` measures trials with and
//! `verify` compares its chosen edit with), compared on the residual entering every block and the final
//! residual, as `verify`'s equivalence check does it (`max ||h_edit − h_hook|| / ||h_hook||` over prompts and
//! positions).
//!
//! Where the edit is a projection of the residual-stream writes (subspaces, per-layer directions, layer
//! kernels, weights of 0, experts), the two agree to f32 rounding. Norm-preserving edits of weight matrices
//! are not a residual-stream transform (the edit rescales each column of W, i.e. each input feature of the
//! write, `W' x = P W F x`), so no hook at our sites equals them: what holds, and is tested, is that the
//! embedding's norm-preserving edit equals the norm-restoring hook exactly, and that every write of the edited
//! model is orthogonal to the basis (the projection hooks change nothing on it).

use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype, Site as WriterSite};
use edit::{Directions, LayerKernel, NoProgress, Options, Profile, Tent, WriteOptions};
use model::{At, Batch, Capture, Chain, Hook, Interventions, Logits, Model, NoHook, Positions, Site};
use serde_json::Map;

/// f32 weights, f32 runtime, two layers: f32 arithmetic alone (verify's bound for the paper's edit).
const F32_EXACT: f64 = 1e-5;

fn fixture(family: &str) -> PathBuf {
    testutil::fixtures().join(format!("models/{family}/f32"))
}

fn prompts() -> Vec<Vec<u32>> {
    [5u32, 9, 13, 20].iter().map(|&n| (0..n).map(|i| (i * 37 + n * 11) % 500 + 3).collect()).collect()
}

/// Deterministic raw vectors of length `d` (not orthogonal).
fn raw(d: usize, seed: usize) -> Vec<f64> {
    (0..d)
        .map(|i| ((i * 31 + seed * 17) % 23) as f64 / 7.0 - 1.5 + (seed as f64 * 0.3 + i as f64 * 0.05).sin())
        .collect()
}

fn write_subspace(dir: &Path, d: usize, k: usize) -> PathBuf {
    let p = dir.join(format!("subspace{k}.safetensors"));
    let v: Vec<f64> = (0..k).flat_map(|m| raw(d, m + 1)).collect();
    direction::set::write_subspace(&p, &v, k, Dtype::F32, &Map::new()).unwrap();
    p
}

fn write_per_layer(dir: &Path, d: usize, layers: usize) -> PathBuf {
    let p = dir.join("per_layer.safetensors");
    let v: Vec<f64> = (0..layers).flat_map(|l| raw(d, 10 + l)).collect();
    let e = raw(d, 40);
    direction::set::write_per_layer(&p, &v, layers, 1, Some((&e, 1)), Dtype::F32, &Map::new()).unwrap();
    p
}

/// The residual entering every block and the final one, for every prompt.
fn residuals(model: &Model, hook: &mut dyn Hook) -> Vec<Vec<f32>> {
    let layers = model.arch().layers;
    let sites: Vec<At> = (0..layers)
        .map(|layer| At { layer, site: Site::Input })
        .chain([At { layer: layers - 1, site: Site::Output }])
        .collect();
    let mut cap = Capture::new(sites.iter().copied(), Positions::All);
    let batch = Batch::new(&prompts()).unwrap();
    model.forward(&batch, Logits::None, &mut Chain(vec![hook, &mut cap])).unwrap();
    sites.iter().map(|&at| cap.take(at).unwrap()).collect()
}

/// `max ||a − b|| / ||b||` per site, over every position.
fn worst(a: &[Vec<f32>], b: &[Vec<f32>], d: usize) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            x.chunks(d)
                .zip(y.chunks(d))
                .map(|(x, y)| {
                    let (mut diff, mut norm) = (0f64, 0f64);
                    for (p, q) in x.iter().zip(y) {
                        diff += (*p as f64 - *q as f64).powi(2);
                        norm += (*q as f64).powi(2);
                    }
                    if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() }
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

struct Outcome {
    /// Edited model against the hooked original.
    edited_vs_hooked: f64,
    /// Edited model with the same hooks against itself: what the edited writes still have in the basis.
    along: f64,
    edits: usize,
}

fn run(family: &str, direction_file: Option<&Path>, opts: &Options) -> Outcome {
    let src = fixture(family);
    let ckpt = Checkpoint::open(&src).unwrap();
    let (d, layers) = (ckpt.config.hidden_size, ckpt.config.num_hidden_layers);
    let directions = match direction_file {
        Some(p) => Directions::open(p, d, layers, None).unwrap(),
        None => {
            let p = testutil::fixtures().join("directions/llama.safetensors");
            Directions::open(&p, d, layers, None).unwrap()
        }
    };
    let plan = edit::plan(&ckpt, opts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    edit::write_directions(&ckpt, &plan, &directions, &out, &WriteOptions::default(), &NoProgress).unwrap();
    let original = Model::open(&src).unwrap();
    let edited = Model::open(&out).unwrap();
    let (mut hooks, idempotent) = verify::equivalence::plan_hooks(&ckpt, &plan, &directions).unwrap();
    assert_eq!(
        idempotent,
        !opts.norm_preserving
            && plan.write_ops(&plan.bases(&ckpt, &directions).unwrap()).iter().all(|w| w.scale == 1.0)
    );
    let hooked = residuals(&original, &mut hooks);
    let plain = residuals(&edited, &mut NoHook);
    // The same writes projected again on the edited model (no norm restoring: that is not idempotent).
    let mut again = Interventions::new(layers, d);
    for w in plan.write_ops(&plan.bases(&ckpt, &directions).unwrap()) {
        let (layer, site) = match (w.layer, w.site) {
            (None, _) => (0, Site::Input),
            (Some(l), Some(WriterSite::Attn)) => (l, Site::Attn),
            (Some(l), _) => (l, Site::Mlp),
        };
        if w.scale == 1.0 {
            again.project_basis(layer, site, w.basis.as_slice(), 1.0, false).unwrap();
        }
    }
    let reprojected = residuals(&edited, &mut again);
    let max = |v: Vec<f64>| v.into_iter().fold(0f64, f64::max);
    let o = Outcome {
        edited_vs_hooked: max(worst(&plain, &hooked, d)),
        along: max(worst(&plain, &reprojected, d)),
        edits: plan.edits.len(),
    };
    eprintln!(
        "{family} {:?}: edited vs hooked {:.2e}, along the basis {:.2e}, {} tensors",
        direction_file.map(|p| p.file_name().unwrap().to_owned()),
        o.edited_vs_hooked,
        o.along,
        o.edits
    );
    o
}

#[test]
fn subspace_edits_equal_their_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["llama", "llama_bias", "qwen3_moe", "phi3"] {
        let p = write_subspace(tmp.path(), 64, 3);
        let o = run(family, Some(&p), &Options::default());
        assert!(o.edited_vs_hooked <= F32_EXACT && o.along <= F32_EXACT, "{family}");
        // A scaled subspace edit (attenuation) is the same projection of the writes, scaled.
        let o = run(family, Some(&p), &Options { scale: 0.6, ..Options::default() });
        assert!(o.edited_vs_hooked <= F32_EXACT, "{family} at scale 0.6");
    }
}

#[test]
fn per_layer_directions_and_layer_kernels_equal_their_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_per_layer(tmp.path(), 64, 2);
    for family in ["llama", "llama_bias", "qwen2_moe"] {
        let o = run(family, Some(&p), &Options::default());
        assert!(o.edited_vs_hooked <= F32_EXACT && o.along <= F32_EXACT, "{family}");
        // heretic's tent on the attention writes, a table weight on the embedding, a zero weight on layer 1's
        // MLP (left unedited, and unhooked).
        let kernel = LayerKernel {
            attn: Some(Profile::Tent(Tent { peak: 1.2, position: 0.5, min: 0.4, width: 1.0 })),
            mlp: Some(Profile::Table(vec![0.8, 0.0])),
            embedding: Some(0.5),
        };
        let o = run(family, Some(&p), &Options { kernel, ..Options::default() });
        assert!(o.edited_vs_hooked <= F32_EXACT, "{family} with a kernel");
    }
    // The paper's direction with a kernel, too.
    let kernel = LayerKernel {
        attn: Some(Profile::Tent(Tent { peak: 1.0, position: 1.0, min: 0.0, width: 1.0 })),
        mlp: None,
        embedding: Some(0.0),
    };
    let o = run("llama", None, &Options { kernel, ..Options::default() });
    assert!(o.edited_vs_hooked <= F32_EXACT);
}

#[test]
fn norm_preserving_embedding_equals_the_norm_restoring_hook() {
    // Only the embedding edited: each token's row is one written vector, so restoring its norm is a
    // transform of the residual entering layer 0, and the hook is exact.
    let tmp = tempfile::tempdir().unwrap();
    let p = write_subspace(tmp.path(), 64, 2);
    let kernel = LayerKernel {
        attn: Some(Profile::Table(vec![0.0, 0.0])),
        mlp: Some(Profile::Table(vec![0.0, 0.0])),
        embedding: None,
    };
    for (family, dir) in [("llama", None), ("llama", Some(p.as_path())), ("gemma", None)] {
        let o = run(family, dir, &Options { norm_preserving: true, kernel: kernel.clone(), ..Options::default() });
        assert_eq!(o.edits, 1, "{family}: the embedding alone");
        assert!(o.edited_vs_hooked <= F32_EXACT, "{family}");
    }
}

#[test]
fn norm_preserving_weights_write_nothing_along_the_basis_but_are_not_a_hook() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write_subspace(tmp.path(), 64, 2);
    for (family, dir) in [("llama_bias", None), ("llama", Some(p.as_path()))] {
        let o = run(family, dir, &Options { norm_preserving: true, ..Options::default() });
        // Every write of the edited model is orthogonal to the basis ...
        assert!(o.along <= F32_EXACT, "{family}");
        // ... but the columns were rescaled, which no residual-stream hook reproduces: the difference to the
        // projection hooks is the rescaling itself, second order in the removed component (measured, not
        // zero).
        assert!(o.edited_vs_hooked > 1e-4 && o.edited_vs_hooked < 0.5, "{family}: {}", o.edited_vs_hooked);
    }
}
