//! `abliterate diff --detect` on our own edits (every variant, on fixtures and on SmolLM2 with
//! ../shared/directions) and on an unedited fine-tune (the refusing SmolLM2 against its base: a merged LoRA),
//! and on a synthetic LoRA-like change of a fixture. docs/variants.md, "Detection".

mod util;

use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype};
use edit::{Directions, LayerKernel, NoProgress, Options, Profile, Tent, WriteOptions};
use serde_json::{Map, Value};
use util::{abliterate, fixture};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn edit_with(src: &Path, dir: &Directions, opts: &Options, out: &Path) {
    let ckpt = Checkpoint::open(src).unwrap();
    let plan = edit::plan(&ckpt, opts).unwrap();
    edit::write_directions(&ckpt, &plan, dir, out, &WriteOptions { force: true }, &NoProgress).unwrap();
}

fn detect(a: &Path, b: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["diff", s(a), s(b), "--detect", "--json"];
    args.extend_from_slice(extra);
    let run = abliterate(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

/// `sum_m (v_m · u)^2` for unit `u` and an orthonormal basis: 1 when `u` lies in the span.
fn in_span(basis: &direction::Basis, u: &[f64]) -> f64 {
    basis.vectors().map(|v| v.iter().zip(u).map(|(a, b)| a * b).sum::<f64>().powi(2)).sum()
}

fn subspace(dir: &Path, d: usize, k: usize) -> PathBuf {
    let p = dir.join(format!("sub{k}.safetensors"));
    let v: Vec<f64> =
        (0..k * d).map(|i| ((i * 7919) % 97) as f64 / 50.0 - 1.0 + ((i / d) as f64 * 0.7 + i as f64).sin()).collect();
    direction::set::write_subspace(&p, &v, k, Dtype::F32, &Map::new()).unwrap();
    p
}

#[test]
fn detects_every_variant_of_our_edits_on_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let r_file = fixture("directions/llama.safetensors");
    for dtype in ["f32", "bf16"] {
        let src = fixture(&format!("models/llama/{dtype}"));
        let r = Directions::open(&r_file, 64, 2, None).unwrap();
        let r_hat = r.for_layer(None).clone();
        // The paper's edit, then norm-preserving, then a tent kernel: one shared direction, the true one.
        let kernel = LayerKernel {
            attn: Some(Profile::Tent(Tent { peak: 1.0, position: 1.0, min: 0.5, width: 1.0 })),
            mlp: None,
            embedding: Some(0.0),
        };
        let cases = [
            ("paper", Options::default()),
            ("norm_preserving", Options { norm_preserving: true, ..Options::default() }),
            ("kernel", Options { kernel, ..Options::default() }),
        ];
        for (name, opts) in cases {
            let out = t.join(format!("{dtype}-{name}"));
            edit_with(&src, &r, &opts, &out);
            let det = t.join(format!("{dtype}-{name}.safetensors"));
            let v = detect(&src, &out, &["--detected", s(&det)]);
            assert_eq!(v["verdict"], "shared_rank_1", "{dtype} {name}: {v:#}");
            assert!(v["explained_median"].as_f64().unwrap() >= 0.99, "{dtype} {name}");
            assert_eq!(v["other_changed"].as_array().unwrap().len(), 0, "{dtype} {name}");
            let found = direction::Direction::load(&det, 64).unwrap().unit();
            let cos2 = in_span(&r_hat, &found);
            assert!(cos2 >= 0.999, "{dtype} {name}: cos² with r̂ {cos2}");
            if name == "norm_preserving" && dtype == "f32" {
                assert!(v["written_norm_change_max"].as_f64().unwrap() < 1e-6, "{v:#}");
            }
            if name == "kernel" {
                // The embedding was left (weight 0); every other writer changed.
                assert_eq!(v["changed_writers"], 4);
                assert_eq!(v["unchanged_writers"], 1);
            }
        }
        // A subspace of 2: two shared directions spanning the true subspace.
        let p = subspace(t, 64, 2);
        let sub = Directions::open(&p, 64, 2, None).unwrap();
        let out = t.join(format!("{dtype}-sub"));
        edit_with(&src, &sub, &Options::default(), &out);
        let det = t.join(format!("{dtype}-sub.safetensors"));
        let v = detect(&src, &out, &["--detected", s(&det)]);
        assert_eq!(v["verdict"], "shared_rank_2", "{dtype} subspace: {v:#}");
        let found = Directions::open(&det, 64, 2, None).unwrap();
        for m in 0..2 {
            let f = found.for_layer(None).vector(m);
            assert!(in_span(sub.for_layer(None), f) >= 0.999, "{dtype}: detected vector {m} outside the subspace");
        }
    }
}

#[test]
fn per_layer_directions_are_rank_one_but_not_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("models/llama/f32");
    let p = tmp.path().join("pl.safetensors");
    let v: Vec<f64> =
        (0..128).map(|i| ((i * 31) % 17) as f64 - 8.0 + (i as f64 * 0.37).cos() * (i / 64 + 1) as f64).collect();
    let e: Vec<f64> = (0..64).map(|i| (i as f64 * 1.3).sin()).collect();
    direction::set::write_per_layer(&p, &v, 2, 1, Some((&e, 1)), Dtype::F32, &Map::new()).unwrap();
    let dirs = Directions::open(&p, 64, 2, None).unwrap();
    let out = tmp.path().join("out");
    edit_with(&src, &dirs, &Options::default(), &out);
    // Three different directions (two layers and the embedding): not one shared direction.
    let v = detect(&src, &out, &["--max-k", "1"]);
    assert_eq!(v["verdict"], "per_layer_rank_1", "{v:#}");
}

#[test]
fn a_lora_like_change_is_not_an_abliteration() {
    // Every projection of every layer (q, o, down ...) gets its own random rank-4 update, as a merged LoRA does.
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("models/llama/f32");
    let out = tmp.path().join("lora");
    util::copy_dir(&src, &out);
    let ckpt = Checkpoint::open(&src).unwrap();
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    let mut seed = 12345u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for (_, t) in ckpt.tensors() {
        let mut w = ckpt.read_f32(&t.name).unwrap().into_iter().map(|x| x as f64).collect::<Vec<_>>();
        if t.shape.len() == 2 && t.name.contains("layers") {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let b: Vec<f64> = (0..rows * 4).map(|_| rand() * 0.05).collect();
            let a: Vec<f64> = (0..4 * cols).map(|_| rand() * 0.05).collect();
            for i in 0..rows {
                for j in 0..cols {
                    w[i * cols + j] += (0..4).map(|r| b[i * 4 + r] * a[r * cols + j]).sum::<f64>();
                }
            }
        }
        let begin = data.len();
        checkpoint::dtype::encode_f64(Dtype::F32, &w, &mut data);
        tensors.push(checkpoint::safetensors::TensorEntry {
            name: t.name.clone(),
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            begin,
            end: data.len(),
        });
    }
    let mut bytes = checkpoint::safetensors::write_header(None, &tensors);
    bytes.extend_from_slice(&data);
    std::fs::write(out.join("model.safetensors"), bytes).unwrap();
    let v = detect(&src, &out, &[]);
    assert_eq!(v["verdict"], "not_low_rank", "{v:#}");
    assert!(
        v["other_changed"].as_array().unwrap().iter().any(|x| x["name"].as_str().unwrap().ends_with("q_proj.weight"))
    );
}

/// The real model: our edits of SmolLM2 (the paper's and norm-preserving, with ../shared/directions) are found
/// with the direction; the refusing model (a merged LoRA) against its base is not an abliteration.
#[test]
fn real_model_edits_are_detected_and_a_merged_lora_is_not() {
    let (Some(base), Some(refusal), Some(dir_file)) =
        (testutil::smollm2(), testutil::smollm2_refusal(), testutil::smollm2_direction())
    else {
        eprintln!("skipping real_model_edits_are_detected_and_a_merged_lora_is_not: ../shared is absent");
        return;
    };
    let v = detect(&base, &refusal, &[]);
    eprintln!(
        "refusing vs base: {} (one shared direction explains a median {:.4}; {} other tensors changed)",
        v["verdict"],
        {
            let mut e: Vec<f64> =
                v["writers"].as_array().unwrap().iter().map(|w| w["explained"][0].as_f64().unwrap()).collect();
            e.sort_by(f64::total_cmp);
            e[e.len() / 2]
        },
        v["other_changed"].as_array().unwrap().len()
    );
    assert_eq!(v["verdict"], "not_low_rank", "{v:#}");
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(&base).unwrap();
    let r = Directions::open(&dir_file, ckpt.config.hidden_size, ckpt.config.num_hidden_layers, None).unwrap();
    for (name, opts) in
        [("paper", Options::default()), ("norm_preserving", Options { norm_preserving: true, ..Options::default() })]
    {
        let out = tmp.path().join(name);
        edit_with(&base, &r, &opts, &out);
        let det = tmp.path().join(format!("{name}.safetensors"));
        let v = detect(&base, &out, &["--detected", s(&det)]);
        let found = direction::Direction::load(&det, ckpt.config.hidden_size).unwrap().unit();
        let cos2 = in_span(r.for_layer(None), &found);
        eprintln!(
            "SmolLM2 {name}: {} (median {:.5}, min {:.5}), cos² with r̂ {cos2:.6}, norm change {:.2e}",
            v["verdict"],
            v["explained_median"].as_f64().unwrap(),
            v["explained_min"].as_f64().unwrap(),
            v["written_norm_change_max"].as_f64().unwrap()
        );
        assert_eq!(v["verdict"], "shared_rank_1", "{name}: {v:#}");
        assert!(cos2 >= 0.9999, "{name}: {cos2}");
        assert_eq!(v["changed_writers"], 61);
    }
    // A tent kernel (attention and MLP around layer 15, embedding left): fewer writers, the same direction.
    let kernel = LayerKernel {
        attn: Some(Profile::Tent(Tent { peak: 1.0, position: 15.0, min: 0.3, width: 8.0 })),
        mlp: Some(Profile::Tent(Tent { peak: 0.8, position: 12.0, min: 0.2, width: 6.0 })),
        embedding: Some(0.0),
    };
    let out = tmp.path().join("kernel");
    edit_with(&base, &r, &Options { kernel, ..Options::default() }, &out);
    let det = tmp.path().join("kernel.safetensors");
    let v = detect(&base, &out, &["--detected", s(&det)]);
    let found = direction::Direction::load(&det, ckpt.config.hidden_size).unwrap().unit();
    let cos2 = in_span(r.for_layer(None), &found);
    eprintln!("SmolLM2 tent kernel: {} over {} writers, cos² {cos2:.6}", v["verdict"], v["changed_writers"]);
    assert_eq!(v["verdict"], "shared_rank_1", "{v:#}");
    assert_eq!(v["changed_writers"], 17 + 13);
    assert!(cos2 >= 0.9999);
    // A subspace of two real directions (the base model's and the refusing model's reference direction).
    let Some(shared) = testutil::shared() else { unreachable!("the models were built from ../shared") };
    let sub_file = tmp.path().join("sub.safetensors");
    let reference = shared.join("reference/direction.safetensors");
    let run = abliterate(["direction", "stack", s(&dir_file), s(&reference), "-o", s(&sub_file)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sub = Directions::open(&sub_file, 576, 30, None).unwrap();
    let out = tmp.path().join("sub");
    edit_with(&base, &sub, &Options::default(), &out);
    let det = tmp.path().join("sub-detected.safetensors");
    let v = detect(&base, &out, &["--detected", s(&det)]);
    let found = Directions::open(&det, 576, 30, None).unwrap();
    let spans: Vec<f64> = (0..2).map(|m| in_span(sub.for_layer(None), found.for_layer(None).vector(m))).collect();
    eprintln!(
        "SmolLM2 subspace of 2: {} (median {:.5}), detected vectors in the span {spans:?}",
        v["verdict"],
        v["explained_median"].as_f64().unwrap()
    );
    assert_eq!(v["verdict"], "shared_rank_2", "{v:#}");
    assert!(spans.iter().all(|&x| x >= 0.999));
    // Per-layer directions: the refusing model edited with the reference's own candidates at position -1.
    let cands = shared.join("reference/candidates.safetensors");
    let pl = tmp.path().join("per_layer.safetensors");
    let run = abliterate(["direction", "per-layer", s(&cands), "--position", "-1", "-o", s(&pl)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let per_layer = Directions::open(&pl, 576, 30, None).unwrap();
    let out = tmp.path().join("per_layer");
    edit_with(&refusal, &per_layer, &Options::default(), &out);
    let v = detect(&refusal, &out, &[]);
    eprintln!(
        "refusing SmolLM2 with per-layer candidates: {} (median {:.5}, min {:.5}); one shared direction explains a median {:.3}",
        v["verdict"],
        v["explained_median"].as_f64().unwrap(),
        v["explained_min"].as_f64().unwrap(),
        {
            let mut e: Vec<f64> =
                v["writers"].as_array().unwrap().iter().map(|w| w["explained"][0].as_f64().unwrap()).collect();
            e.sort_by(f64::total_cmp);
            e[e.len() / 2]
        }
    );
    let verdict = v["verdict"].as_str().unwrap();
    assert!(verdict == "per_layer_rank_1" || verdict.starts_with("shared_rank_"), "{v:#}");
}
