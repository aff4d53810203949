//! `abliterate edit` on every family fixture (`fixtures/models/<family>/{bf16,f32}`), checked
//! independently of the editor: every residual writer (found from the checkpoint's roles) loses
//! its component along the direction up to the stored dtype's rounding (method.md §6, law 1),
//! everything else is byte-identical, tied embeddings are untied, and Gemma 2/3's post-norm writers
//! are edited so that what reaches the residual stream, `g ⊙ W'x`, has no component along r̂.

mod util;

use std::path::PathBuf;

use checkpoint::{Checkpoint, Dtype, Role, Site, WriterKind};
use testutil::synth;
use util::{abliterate, fixture};

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for family in std::fs::read_dir(fixture("models")).unwrap() {
        let family = family.unwrap().path();
        if !family.is_dir() {
            continue;
        }
        for layout in std::fs::read_dir(&family).unwrap() {
            let layout = layout.unwrap().path();
            if layout.join("config.json").is_file() {
                dirs.push(layout);
            }
        }
    }
    dirs.sort();
    dirs
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| x / n).collect()
}

/// Projections `c_q = Σ_i u_i W[o, i, j]` over the writer view.
fn project(w: &[f32], (outer, d, inner): (usize, usize, usize), u: &[f64]) -> Vec<f64> {
    let mut c = vec![0f64; outer * inner];
    for o in 0..outer {
        for i in 0..d {
            for j in 0..inner {
                c[o * inner + j] += u[i] * w[(o * d + i) * inner + j] as f64;
            }
        }
    }
    c
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The gain `g = 1 + w` of a layer's post-norm (Gemma 2/3).
fn gain(ckpt: &Checkpoint, layer: usize, site: Site) -> Vec<f64> {
    let (r, _) = ckpt
        .tensors()
        .find(|(r, _)| ckpt.role(*r) == Role::PostNorm { layer, site })
        .expect("every Gemma 2/3 layer has both post-norms");
    ckpt.read_f32(&ckpt.entry(r).name).unwrap().iter().map(|w| 1.0 + *w as f64).collect()
}

/// Deterministic inputs for `W x`.
fn inputs(k: usize, n: usize) -> Vec<Vec<f64>> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            (0..k)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                })
                .collect()
        })
        .collect()
}

/// `Σ_x (r̂ᵀ(g ⊙ W x))²` over the inputs, for a `[d, k]` weight.
fn gained_component(w: &[f64], d: usize, k: usize, g: &[f64], r_hat: &[f64], xs: &[Vec<f64>]) -> f64 {
    xs.iter()
        .map(|x| {
            let y: f64 = (0..d).map(|i| r_hat[i] * g[i] * (0..k).map(|j| w[i * k + j] * x[j]).sum::<f64>()).sum();
            y * y
        })
        .sum()
}

#[test]
fn every_family_fixture_edits_and_loses_the_direction() {
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 20, "family fixtures are committed: {dirs:?}");
    let direction_file = fixture("directions/llama.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    for model in &dirs {
        let label = model.strip_prefix(fixture("models")).unwrap().display().to_string();
        let before = synth::hash_dir(model);
        let out = tmp.path().join(label.replace('/', "-"));
        let r = abliterate([
            "edit",
            model.to_str().unwrap(),
            "--direction",
            direction_file.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 0, "{label}: {}", r.stderr);
        assert_eq!(synth::hash_dir(model), before, "{label}: the input changed");

        let input = Checkpoint::open(model).unwrap();
        let edited = Checkpoint::open(&out).unwrap();
        let d = input.config.hidden_size;
        let direction = direction::Direction::load(&direction_file, d).unwrap();
        let r_hat = unit(&direction.values);
        let changed = synth::assert_same_layout(model, &out);

        let mut writers = Vec::new();
        let mut worst = 0f64;
        for (r, t) in input.tensors() {
            let Role::Writer(w) = input.role(r) else { continue };
            writers.push(t.name.clone());
            let post_norm = input.config.family.has_post_norms() && w.kind != WriterKind::Embedding;
            let u = match (post_norm, w.layer, w.site()) {
                (true, Some(l), Some(site)) => {
                    unit(&gain(&input, l, site).iter().zip(&r_hat).map(|(g, r)| g * r).collect::<Vec<_>>())
                }
                _ => r_hat.clone(),
            };
            let view = w.view(&t.shape);
            let (a, b) = (input.read_f32(&t.name).unwrap(), edited.read_f32(&t.name).unwrap());
            let (c, c_after) = (project(&a, view, &u), project(&b, view, &u));
            // Law 1 per column: |uᵀW'| ≤ unit roundoff · Σ_i |u_i||W'_i|, plus a float64 term.
            let abs_u: Vec<f64> = u.iter().map(|x| x.abs()).collect();
            let abs_b: Vec<f32> = b.iter().map(|x| x.abs()).collect();
            let bound = project(&abs_b, view, &abs_u);
            let roundoff = t.dtype.unit_roundoff().unwrap();
            for (q, (ca, bq)) in c_after.iter().zip(&bound).enumerate() {
                assert!(ca.abs() <= roundoff * bq + 1e-12, "{label}: `{}` column {q}: {ca:e} > {bq:e}", t.name);
            }
            let ratio = norm(&c_after) / norm(&c);
            worst = worst.max(ratio);
            let limit = if t.dtype == Dtype::F32 { 1e-5 } else { 0.02 };
            assert!(ratio < limit, "{label}: `{}` keeps {ratio:e} of its component", t.name);

            if post_norm && !w.bias && w.expert.is_none() {
                // What reaches the residual stream is g ⊙ W'x: its r̂ component is gone, while the
                // naive edit against r̂ would leave a clear part of it (the gains are far from 1).
                let (l, site) = (w.layer.unwrap(), w.site().unwrap());
                let g = gain(&input, l, site);
                let k = t.shape[1];
                let xs = inputs(k, 8);
                let a64: Vec<f64> = a.iter().map(|x| *x as f64).collect();
                let b64: Vec<f64> = b.iter().map(|x| *x as f64).collect();
                let c_r = project(&a, view, &r_hat);
                let naive: Vec<f64> = (0..d * k).map(|n| a64[n] - r_hat[n / k] * c_r[n % k]).collect();
                let orig = gained_component(&a64, d, k, &g, &r_hat, &xs);
                let after = (gained_component(&b64, d, k, &g, &r_hat, &xs) / orig).sqrt();
                let naive_after = (gained_component(&naive, d, k, &g, &r_hat, &xs) / orig).sqrt();
                assert!(after < limit, "{label}: `{}`: r̂ᵀ(g ⊙ W'x) keeps {after:e}", t.name);
                assert!(naive_after > 0.05, "{label}: `{}`: the naive edit would keep {naive_after:e}", t.name);
            }
        }
        let mut writers_sorted = writers.clone();
        writers_sorted.sort();
        assert_eq!(changed, writers_sorted, "{label}: exactly the residual writers changed");

        // Tied embeddings are untied: lm_head.weight is the original embedding.
        if input.tied() {
            let emb = input.embedding_name().unwrap();
            let (ri, _) = input.get(emb).unwrap();
            let (ro, _) = edited.get("lm_head.weight").expect("untied head added");
            assert_eq!(edited.bytes(ro), input.bytes(ri), "{label}");
            assert!(!edited.config.tie_word_embeddings, "{label}");
        } else {
            assert_eq!(edited.tensors().count(), input.tensors().count(), "{label}: nothing added");
        }
        eprintln!("{label}: {} writers edited, worst |uᵀW'|/|uᵀW| {worst:.2e}", writers.len());
    }
}

#[test]
fn keep_tie_on_gemma3_keeps_config_and_head() {
    let model = fixture("models/gemma3/bf16");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dir = fixture("directions/llama.safetensors");
    let r = abliterate([
        "edit",
        model.to_str().unwrap(),
        "--direction",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--keep-tie",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("--keep-tie: the embedding is tied to the LM head, so the edit also changes the unembedding")
    );
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), std::fs::read(model.join("config.json")).unwrap());
    assert!(Checkpoint::open(&out).unwrap().tied());
}
