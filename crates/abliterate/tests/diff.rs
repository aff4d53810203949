//! `abliterate diff` on fixtures and on copies of them changed here by known updates. Every
//! expected number is computed in this file from the stored values (plain loops, Gram-Schmidt),
//! independently of the `diff` crate.

mod util;

use std::path::{Path, PathBuf};

use checkpoint::Checkpoint;
use checkpoint::dtype::encode_f64;
use checkpoint::safetensors::{self, TensorEntry};
use expect_test::expect;
use serde_json::Value;
use util::{Run, abliterate, copy_dir, fixture};

const DIRECTION: &str = "directions/llama.safetensors";

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn unit(a: &[f64]) -> Vec<f64> {
    let n = norm(a);
    a.iter().map(|x| x / n).collect()
}

/// `||P r||` for the orthogonal projector P onto span(vs) (Gram-Schmidt).
fn projection_norm(r: &[f64], vs: &[&[f64]]) -> f64 {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for v in vs {
        let mut u = v.to_vec();
        for e in &basis {
            let c = dot(&u, e);
            u.iter_mut().zip(e).for_each(|(x, y)| *x -= c * y);
        }
        basis.push(unit(&u));
    }
    basis.iter().map(|e| dot(r, e).powi(2)).sum::<f64>().sqrt()
}

/// The unit direction of the fixture direction file (r / ||r|| in f64).
fn r_hat() -> Vec<f64> {
    direction::Direction::load(&fixture(DIRECTION), 64).unwrap().unit()
}

/// A copy of a fixture model in a temp dir.
fn copy(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    copy_dir(&fixture(rel), &dir);
    (tmp, dir)
}

/// A tensor's stored values (exact, as f64) and shape.
fn read(dir: &Path, name: &str) -> (Vec<f64>, Vec<usize>) {
    let c = Checkpoint::open(dir).unwrap();
    let shape = c.get(name).unwrap().1.shape.clone();
    (c.read_f32(name).unwrap().into_iter().map(f64::from).collect(), shape)
}

/// Overwrites a tensor in place with `values` rounded once to its stored dtype; returns what is
/// now stored.
fn write(dir: &Path, name: &str, values: &[f64]) -> Vec<f64> {
    let (path, dtype, start) = {
        let c = Checkpoint::open(dir).unwrap();
        let (r, t) = c.get(name).unwrap();
        let s = &c.shards[r.shard];
        (s.path.clone(), t.dtype, s.header.data_start() + t.begin)
    };
    let mut enc = Vec::new();
    encode_f64(dtype, values, &mut enc);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start..start + enc.len()].copy_from_slice(&enc);
    std::fs::write(&path, bytes).unwrap();
    read(dir, name).0
}

/// `W + Σ a bᵀ` for a row-major `[rows, cols]` matrix.
fn plus_outer(w: &[f64], cols: usize, terms: &[(&[f64], &[f64])]) -> Vec<f64> {
    let mut out = w.to_vec();
    for (a, b) in terms {
        for (i, ai) in a.iter().enumerate() {
            for (j, bj) in b.iter().enumerate() {
                out[i * cols + j] += ai * bj;
            }
        }
    }
    out
}

/// `(outer, d, inner)` around the d_model axis.
fn view(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

/// `c[o, i] = Σ_k u_k W[o, k, i]`: the projections of every column on `u`.
fn projections(w: &[f64], (outer, d, inner): (usize, usize, usize), u: &[f64]) -> Vec<f64> {
    let mut c = vec![0f64; outer * inner];
    for o in 0..outer {
        for k in 0..d {
            for i in 0..inner {
                c[o * inner + i] += u[k] * w[(o * d + k) * inner + i];
            }
        }
    }
    c
}

/// method.md §6 in f64: `W' = W - u (uᵀW)` on the d_model axis.
fn orthogonalize(w: &[f64], v: (usize, usize, usize), u: &[f64]) -> Vec<f64> {
    let (outer, d, inner) = v;
    let c = projections(w, v, u);
    let mut out = w.to_vec();
    for o in 0..outer {
        for k in 0..d {
            for i in 0..inner {
                out[(o * d + k) * inner + i] -= u[k] * c[o * inner + i];
            }
        }
    }
    out
}

fn diff(args: &[&std::ffi::OsStr]) -> Run {
    let mut all: Vec<&std::ffi::OsStr> = vec!["diff".as_ref()];
    all.extend_from_slice(args);
    abliterate(all)
}

fn diff_json(a: &Path, b: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<&std::ffi::OsStr> = vec![a.as_os_str(), b.as_os_str(), "--json".as_ref()];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    let run = diff(&args);
    assert!(run.code == 0 || run.code == 1, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

fn tensor<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn close(got: f64, want: f64, rel: f64) {
    assert!((got - want).abs() <= rel * want.abs(), "got {got:e}, want {want:e} (relative tolerance {rel:e})");
}

/// Replaces the temp paths in human output so that snapshots are stable.
fn scrub(s: &str, a: &Path, b: &Path) -> String {
    s.replace(&b.display().to_string(), "B").replace(&a.display().to_string(), "A")
}

#[test]
fn identical_checkpoints() {
    let a = fixture("models/llama/bf16");
    let (_tmp, b) = copy("models/llama/bf16");
    let run = diff(&[a.as_os_str(), b.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    expect![[r#"
        A: A (llama, 20 tensors)
        B: B (llama, 20 tensors)
        tensors: 20 identical
        config.json: identical
        by kind:
          embedding: 1 identical
          attn_out: 2 identical
          mlp_down: 2 identical
          attn_in: 6 identical
          final_norm: 1 identical
          mlp_in: 4 identical
          pre_norm: 4 identical
    "#]]
    .assert_eq(&scrub(&run.stdout, &a, &b));
    let v = diff_json(&a, &b, &["--direction", fixture(DIRECTION).to_str().unwrap()]);
    assert_eq!(v["counts"], serde_json::json!({"identical": 20}));
    assert_eq!(v["config_changes"], serde_json::json!([]));
    assert_eq!(v["files"], serde_json::json!({"changed": [], "only_in_a": [], "only_in_b": []}));
    for t in v["tensors"].as_array().unwrap() {
        assert_eq!((&t["status"], &t["change"]), (&Value::from("identical"), &Value::Null), "{t}");
    }
    // Unchanged writers are still measured for the gate: |r̂ᵀW| / |W|_F of the stored values.
    let r = r_hat();
    let (w, shape) = read(&a, "model.embed_tokens.weight");
    let want = norm(&projections(&w, view(&shape, 1), &r)) / norm(&w);
    close(f(&tensor(&v, "model.embed_tokens.weight")["orthogonality"]), want, 1e-12);
}

#[test]
fn rank_one_update_of_one_tensor() {
    let a = fixture("models/llama/f32");
    let (_tmp, b) = copy("models/llama/f32");
    let name = "model.layers.1.self_attn.o_proj.weight"; // [64, 64], d_model on axis 0, in shard 2
    let r = r_hat();
    let (wa, shape) = read(&a, name);
    let bvec = Rng(1).vec(64, 0.05);
    let wb = write(&b, name, &plus_outer(&wa, 64, &[(&r, &bvec)]));

    let v = diff_json(&a, &b, &["--direction", fixture(DIRECTION).to_str().unwrap()]);
    assert_eq!(v["counts"], serde_json::json!({"identical": 19, "changed": 1}));
    let t = tensor(&v, name);
    assert_eq!((&t["status"], &t["kind"], &t["against"]), (&"changed".into(), &"attn_out".into(), &"r".into()));
    let c = &t["change"];
    let dw: Vec<f64> = wa.iter().zip(&wb).map(|(x, y)| y - x).collect();
    assert_eq!(f(&c["max_abs"]), dw.iter().fold(0.0, |m: f64, x| m.max(x.abs())));
    close(f(&c["rel_frobenius"]), norm(&dw) / norm(&wa), 1e-12);
    assert_eq!((&c["rank"], &c["rank_exact"]), (&1.into(), &true.into()));
    // dW = r̂ bᵀ up to f32 rounding of B: its column space is r̂ itself.
    assert!((f(&c["alignment"]) - 1.0).abs() < 1e-6, "{c}");
    close(f(&c["slices"][0]["singular_values"][0]), norm(&bvec), 1e-5);
    let v_ = view(&shape, 0);
    let (pa, pb) = (norm(&projections(&wa, v_, &r)), norm(&projections(&wb, v_, &r)));
    close(f(&c["projection_ratio"]), pb / pa, 1e-10);
    close(f(&t["orthogonality"]), pb / norm(&wb), 1e-10);
    // Issue 13: `--threads` (shared by every computing command) changes nothing in the report.
    for threads in ["1", "3"] {
        let w = diff_json(&a, &b, &["--direction", fixture(DIRECTION).to_str().unwrap(), "--threads", threads]);
        assert_eq!(w["tensors"], v["tensors"], "--threads {threads}");
    }
}

#[test]
fn rank_two_update_is_rank_two_and_aligned_as_its_span() {
    let a = fixture("models/llama/f32");
    let (_tmp, b) = copy("models/llama/f32");
    // [64, 96]: 96 columns, more than the sketch's 16, so the random sketch is what finds the rank.
    let name = "model.layers.0.mlp.down_proj.weight";
    let r = r_hat();
    let mut rng = Rng(2);
    // a1 = 0.6 r̂ + 0.8 u with u ⟂ r̂; a2 random.
    let u0 = rng.vec(64, 1.0);
    let u = unit(&u0.iter().zip(&r).map(|(x, ri)| x - dot(&u0, &r) * ri).collect::<Vec<_>>());
    let a1: Vec<f64> = r.iter().zip(&u).map(|(ri, ui)| 0.6 * ri + 0.8 * ui).collect();
    let a2 = rng.vec(64, 0.2);
    let (b1, b2) = (rng.vec(96, 0.1), rng.vec(96, 0.1));
    let (wa, _) = read(&a, name);
    let wb = write(&b, name, &plus_outer(&wa, 96, &[(&a1, &b1), (&a2, &b2)]));

    let v = diff_json(&a, &b, &["--direction", fixture(DIRECTION).to_str().unwrap()]);
    let c = &tensor(&v, name)["change"];
    assert_eq!((&c["rank"], &c["rank_exact"]), (&2.into(), &true.into()));
    let want = projection_norm(&r, &[&a1, &a2]);
    assert!((f(&c["alignment"]) - want).abs() < 1e-6, "alignment {} vs {want}", c["alignment"]);
    let dw: Vec<f64> = wa.iter().zip(&wb).map(|(x, y)| y - x).collect();
    close(f(&c["rel_frobenius"]), norm(&dw) / norm(&wa), 1e-12);
    assert_eq!(f(&c["max_abs"]), dw.iter().fold(0.0, |m: f64, x| m.max(x.abs())));
    // Without a direction: the same rank, no alignment and no ratios.
    let v = diff_json(&a, &b, &[]);
    let t = tensor(&v, name);
    assert_eq!(
        (&t["change"]["rank"], &t["change"]["alignment"], &t["orthogonality"]),
        (&2.into(), &Value::Null, &Value::Null)
    );
}

#[test]
fn fused_experts_are_ranked_per_expert() {
    let a = fixture("models/qwen3_moe_fused/bf16");
    let (_tmp, b) = copy("models/qwen3_moe_fused/bf16");
    let name = "model.layers.0.mlp.experts.down_proj"; // [4 experts, 64 (d_model), 32]
    let r = r_hat();
    let (wa, shape) = read(&a, name);
    assert_eq!(shape, [4, 64, 32]);
    let n = 64 * 32;
    let mut w = wa.clone();
    // Expert 0 orthogonalized against r̂ (rank 1), expert 2 a rank-2 update, experts 1 and 3 unchanged.
    let e0 = orthogonalize(&wa[..n], (1, 64, 32), &r);
    w[..n].copy_from_slice(&e0);
    let mut rng = Rng(3);
    let (a1, a2, b1, b2) = (rng.vec(64, 1.0), rng.vec(64, 1.0), rng.vec(32, 0.5), rng.vec(32, 0.5));
    w[2 * n..3 * n].copy_from_slice(&plus_outer(&wa[2 * n..3 * n], 32, &[(&a1, &b1), (&a2, &b2)]));
    write(&b, name, &w);

    let v = diff_json(&a, &b, &["--direction", fixture(DIRECTION).to_str().unwrap()]);
    let c = &tensor(&v, name)["change"];
    let ranks: Vec<u64> = c["slices"].as_array().unwrap().iter().map(|s| s["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [1, 0, 2, 0]);
    assert_eq!(c["rank"], 2);
    // Expert 0's change lies along r̂ (up to bf16 rounding); expert 2's along span(a1, a2).
    assert!(f(&c["slices"][0]["alignment"]) > 0.999, "{c}");
    let want = projection_norm(&r, &[&a1, &a2]);
    assert!((f(&c["slices"][2]["alignment"]) - want).abs() < 1e-2, "{} vs {want}", c["slices"][2]["alignment"]);
    close(f(&c["alignment"]), f(&c["slices"][2]["alignment"]).min(f(&c["slices"][0]["alignment"])), 0.0);
    // The human line says it per expert.
    let run = diff(&[a.as_os_str(), b.as_os_str(), "-v".as_ref()]);
    assert!(run.stdout.contains("rank per expert 1, 0, 2, 0"), "{}", run.stdout);
}

/// A copy of llama/f32 with `edited` writers orthogonalized against r̂ here (f64, one rounding).
fn orthogonalized_copy(edited: &[(&str, usize)]) -> (tempfile::TempDir, PathBuf) {
    let (tmp, b) = copy("models/llama/f32");
    let r = r_hat();
    for (name, axis) in edited {
        let (w, shape) = read(&b, name);
        write(&b, name, &orthogonalize(&w, view(&shape, *axis), &r));
    }
    (tmp, b)
}

const WRITERS: [(&str, usize); 5] = [
    ("model.embed_tokens.weight", 1),
    ("model.layers.0.mlp.down_proj.weight", 0),
    ("model.layers.0.self_attn.o_proj.weight", 0),
    ("model.layers.1.mlp.down_proj.weight", 0),
    ("model.layers.1.self_attn.o_proj.weight", 0),
];

#[test]
fn expect_orthogonal_passes_on_an_orthogonalized_copy() {
    let a = fixture("models/llama/f32");
    let (_tmp, b) = orthogonalized_copy(&WRITERS);
    let dir = fixture(DIRECTION);
    let run = diff(&[
        a.as_os_str(),
        b.as_os_str(),
        "--direction".as_ref(),
        dir.as_os_str(),
        "--expect-orthogonal".as_ref(),
        "1e-6".as_ref(),
    ]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let last = run.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("orthogonality gate passed: 5 residual writers of B, largest |d̂ᵀW|/|W| ")
            && last.ends_with(" <= 1.000e-6"),
        "{last}"
    );
    let v = diff_json(&a, &b, &["--direction", dir.to_str().unwrap(), "--expect-orthogonal", "1e-6"]);
    assert_eq!(v["gate"]["passed"], true);
    assert_eq!(v["gate"]["writers"], 5);
    assert!(f(&v["gate"]["max"]) < 1e-6);
    // Every edit is rank 1 along r̂, and B keeps only f32 rounding along r̂.
    for (name, _) in WRITERS {
        let c = &tensor(&v, name)["change"];
        assert_eq!(c["rank"], 1, "{name}");
        assert!((f(&c["alignment"]) - 1.0).abs() < 1e-6, "{name}: {c}");
        assert!(f(&c["projection_ratio"]) < 1e-5, "{name}: {c}");
    }
}

#[test]
fn expect_orthogonal_fails_naming_the_writers_left() {
    let a = fixture("models/llama/f32");
    let (_tmp, b) = orthogonalized_copy(&WRITERS[..1]);
    let (_tmp2, b2) = orthogonalized_copy(&[WRITERS[0], WRITERS[2]]);
    let dir = fixture(DIRECTION);
    let r = r_hat();
    for (b, left) in [(&b, &WRITERS[1..]), (&b2, &[WRITERS[1], WRITERS[3], WRITERS[4]][..])] {
        let run = diff(&[
            a.as_os_str(),
            b.as_os_str(),
            "--direction".as_ref(),
            dir.as_os_str(),
            "--expect-orthogonal".as_ref(),
            "0.001".as_ref(),
        ]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        let names: Vec<String> = left
            .iter()
            .map(|(name, axis)| {
                let (w, shape) = read(b, name);
                let ratio = norm(&projections(&w, view(&shape, *axis), &r)) / norm(&w);
                format!("`{name}` ({ratio:.3e})")
            })
            .collect();
        assert_eq!(
            run.stderr,
            format!(
                "orthogonality gate failed: {} of 5 residual writers of B keep |d̂ᵀW|/|W| above 1.000e-3: {}\n",
                left.len(),
                names.join(", ")
            )
        );
    }
}

#[test]
fn gemma2_writers_are_measured_against_their_layers_s_hat() {
    // method.md §6: a Gemma 2 block writes g ⊙ u/rms(u), so the edit (and the gate) use
    // ŝ = (g ⊙ r̂)/||g ⊙ r̂|| with g = 1 + w of that layer's post-norm.
    let a = fixture("models/gemma2/bf16");
    let (_tmp, b) = copy("models/gemma2/bf16");
    let r = r_hat();
    let s_hat = |layer: usize| {
        let (w, _) = read(&a, &format!("model.layers.{layer}.post_attention_layernorm.weight"));
        unit(&w.iter().zip(&r).map(|(w, r)| (1.0 + w) * r).collect::<Vec<_>>())
    };
    let (s0, s1) = (s_hat(0), s_hat(1));
    let o0 = "model.layers.0.self_attn.o_proj.weight";
    let (w, shape) = read(&a, o0);
    let wb = write(&b, o0, &orthogonalize(&w, view(&shape, 0), &s0));

    let dir = fixture(DIRECTION);
    let v = diff_json(&a, &b, &["--direction", dir.to_str().unwrap(), "--expect-orthogonal", "0.001"]);
    let t = tensor(&v, o0);
    assert_eq!(t["against"], "s(model.layers.0.post_attention_layernorm.weight)");
    close(f(&t["orthogonality"]), norm(&projections(&wb, view(&shape, 0), &s0)) / norm(&wb), 1e-10);
    assert!(f(&t["orthogonality"]) < 1e-3, "{t}");
    assert!(f(&t["change"]["alignment"]) > 0.999, "{t}");
    // Measured against r̂ instead, the edited writer would still fail: r̂ is not what it zeroes.
    assert!(norm(&projections(&wb, view(&shape, 0), &r)) / norm(&wb) > 1e-2);
    // The untouched layer-1 writer is measured against its own layer's ŝ.
    let o1 = "model.layers.1.self_attn.o_proj.weight";
    let (w1, _) = read(&a, o1);
    let t1 = tensor(&v, o1);
    assert_eq!(t1["against"], "s(model.layers.1.post_attention_layernorm.weight)");
    close(f(&t1["orthogonality"]), norm(&projections(&w1, view(&shape, 0), &s1)) / norm(&w1), 1e-10);
    // The embedding has no post-norm: r̂.
    assert_eq!(tensor(&v, "model.embed_tokens.weight")["against"], "r");
    assert_eq!(v["gate"]["passed"], false);
}

/// A shard's tensors with their bytes, to be changed and written back contiguously.
fn rewrite_shard(path: &Path, f: impl FnOnce(&mut Vec<(TensorEntry, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let h = safetensors::parse(&bytes).unwrap();
    let start = h.data_start();
    let mut list: Vec<(TensorEntry, Vec<u8>)> =
        h.tensors.iter().map(|t| (t.clone(), bytes[start + t.begin..start + t.end].to_vec())).collect();
    f(&mut list);
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (t, b) in &list {
        entries.push(TensorEntry { begin: data.len(), end: data.len() + b.len(), ..t.clone() });
        data.extend_from_slice(b);
    }
    let mut out = safetensors::write_header(h.metadata.as_ref(), &entries);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn tensors_on_one_side_reshaped_or_retyped_and_config_and_file_changes() {
    let a = fixture("models/llama/bf16");
    let (_tmp, b) = copy("models/llama/bf16");
    rewrite_shard(&b.join("model.safetensors"), |list| {
        let take =
            |list: &Vec<(TensorEntry, Vec<u8>)>, n: &str| list.iter().find(|(t, _)| t.name == n).unwrap().clone();
        // An untied LM head: a byte copy of the embedding.
        let (mut e, bytes) = take(list, "model.embed_tokens.weight");
        e.name = "lm_head.weight".into();
        list.push((e, bytes));
        // A norm gain retyped to F32 with the same values.
        let i = list.iter().position(|(t, _)| t.name == "model.layers.0.input_layernorm.weight").unwrap();
        let mut vals = vec![0f64; 64];
        checkpoint::dtype::decode_f64(checkpoint::Dtype::BF16, &list[i].1, &mut vals);
        let mut f32s = Vec::new();
        encode_f64(checkpoint::Dtype::F32, &vals, &mut f32s);
        list[i].0.dtype = checkpoint::Dtype::F32;
        list[i].1 = f32s;
        // The final norm reshaped, and layer 1's input norm gone.
        let j = list.iter().position(|(t, _)| t.name == "model.norm.weight").unwrap();
        list[j].0.shape = vec![32];
        list[j].1.truncate(64);
        list.retain(|(t, _)| t.name != "model.layers.1.input_layernorm.weight");
    });
    let cfg = b.join("config.json");
    let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    c["tie_word_embeddings"] = false.into();
    c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
    std::fs::write(&cfg, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    std::fs::write(b.join("abliterate.json"), "{}").unwrap();
    std::fs::write(b.join("tokenizer_config.json"), "{}").unwrap();

    let run = diff(&[a.as_os_str(), b.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    expect![[r#"
        A: A (llama, 20 tensors)
        B: B (llama, 20 tensors)
        tensors: 17 identical, 1 dtype changed, 1 shape changed, 1 only in A, 1 only in B
        config.json:
          rope_scaling: null -> {"rope_type":"llama3","factor":8.0}
          tie_word_embeddings: true -> false
        other files: changed `tokenizer_config.json`; only in B `abliterate.json`
        by kind:
          embedding: 1 identical
          attn_out: 2 identical
          mlp_down: 2 identical
          attn_in: 6 identical
          final_norm: 1 shape changed
          lm_head: 1 only in B
          mlp_in: 4 identical
          pre_norm: 2 identical, 1 dtype changed, 1 only in A; max |dW| 0, rel |dW| 0, rank 0
        tensors:
          `lm_head.weight` only in B (BF16 [512, 64])
          `model.layers.1.input_layernorm.weight` only in A (BF16 [64])
          `model.norm.weight` shape changed [64] -> [32]
    "#]]
    .assert_eq(&scrub(&run.stdout, &a, &b));
    let run = diff(&[a.as_os_str(), b.as_os_str(), "-v".as_ref()]);
    assert!(
        run.stdout.contains("  `model.layers.0.input_layernorm.weight` dtype changed BF16 -> F32, same values\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn gate_needs_a_direction_and_a_sane_tolerance() {
    let a = fixture("models/llama/bf16");
    let run = diff(&[a.as_os_str(), a.as_os_str(), "--expect-orthogonal".as_ref(), "1e-3".as_ref()]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--direction"), "{}", run.stderr);
    let dir = fixture(DIRECTION);
    let run = diff(&[
        a.as_os_str(),
        a.as_os_str(),
        "--direction".as_ref(),
        dir.as_os_str(),
        "--expect-orthogonal=-1".as_ref(),
    ]);
    assert_eq!(run.code, 2);
    assert_eq!(run.stderr, "error: --expect-orthogonal -1: the tolerance must be a finite number >= 0\n");
}

#[test]
fn a_real_edit_of_smollm2_is_rank_one_along_the_direction_and_passes_the_gate() {
    let (Some(model), Some(direction)) = (testutil::smollm2(), testutil::smollm2_direction()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("edited");
    let run = abliterate([
        "edit".as_ref(),
        model.as_os_str(),
        "--direction".as_ref(),
        direction.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = diff_json(&model, &out, &["--direction", direction.to_str().unwrap(), "--expect-orthogonal", "1e-3"]);
    assert_eq!(v["counts"], serde_json::json!({"identical": 211, "changed": 61, "only_in_b": 1}));
    assert_eq!(v["config_changes"], serde_json::json!([{"key": "tie_word_embeddings", "a": true, "b": false}]));
    assert_eq!(tensor(&v, "lm_head.weight")["status"], "only_in_b");
    for t in v["tensors"].as_array().unwrap().iter().filter(|t| t["status"] == "changed") {
        let c = &t["change"];
        assert_eq!(t["against"], "r", "{}", t["name"]);
        // method.md §6, law 4: W - W' = r̂ (r̂ᵀW) has rank one, along r̂; what is left along r̂ is
        // bf16 rounding.
        assert_eq!((&c["rank"], &c["rank_exact"]), (&1.into(), &true.into()), "{}", t["name"]);
        assert!(f(&c["alignment"]) > 0.9995, "{}: {c}", t["name"]);
        assert!(f(&c["projection_ratio"]) < 5e-3, "{}: {c}", t["name"]);
    }
    assert_eq!(v["gate"]["passed"], true);
    assert_eq!(v["gate"]["writers"], 61);
    assert!(f(&v["gate"]["max"]) < 3e-4, "{}", v["gate"]);
}

/// Issue 13: the gain-weighted ŝ, the writer-kind labels and the `against` labels had two
/// definitions each (edit's and diff's). One each now, in `checkpoint`: edit's manifest, diff and
/// inspect name every edited tensor's kind and unit vector alike, and the diff of an edit of
/// Gemma 2 finds every writer orthogonal to the ŝ the edit removed.
#[test]
fn edit_diff_and_inspect_agree_on_kinds_and_unit_vectors() {
    let a = fixture("models/gemma2/bf16");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = fixture(DIRECTION);
    let run =
        abliterate(["edit", a.to_str().unwrap(), "--direction", dir.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let manifest: Value = serde_json::from_slice(&std::fs::read(out.join("abliterate.json")).unwrap()).unwrap();
    let v = diff_json(&a, &out, &["--direction", dir.to_str().unwrap(), "--expect-orthogonal", "0.01"]);
    let run = abliterate(["inspect", a.to_str().unwrap(), "--json"]);
    let inspect: Value = serde_json::from_str(&run.stdout).unwrap();
    let edited = manifest["edited"].as_array().unwrap();
    assert_eq!(edited.len(), 5);
    for l in edited {
        let name = l["name"].as_str().unwrap();
        let t = tensor(&v, name);
        assert_eq!((&t["kind"], &t["against"]), (&l["kind"], &l["against"]), "{name}");
        assert_eq!(inspect["edit"]["against"][name], l["against"], "{name}");
        let listed = inspect["residual_writers"]["list"].as_array().unwrap().iter().find(|w| w["name"] == name);
        assert_eq!(listed.unwrap()["kind"], l["kind"], "{name}");
    }
    assert_eq!(v["gate"]["passed"], true, "{}", v["gate"]);
}
