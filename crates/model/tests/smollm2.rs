//! Conformance on the real test model (SmolLM2-135M-Instruct, f32) against transformers 4.57.1
//! (`fixtures/smollm2/reference.safetensors`, made by `fixtures/smollm2/make_reference.py`).
//! Skips with a message where `../shared` is absent. One model is loaded per test binary.

use std::sync::OnceLock;

use model::{
    At, Batch, Capture, Chain, GenerateOptions, Interventions, LoadOptions, Logits, Model, NoHook, Positions, Site,
    WeightWidth,
};
use testutil::reference::{Reference, max_abs, max_abs_diff};

struct Fixture {
    /// At f32 width.
    model: Model,
    /// The same checkpoint (bf16) held at its stored width.
    stored: Model,
    reference: Reference,
    direction: Vec<f64>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let dir = testutil::smollm2()?;
        let open = |weights| Model::open_with(&dir, LoadOptions { weights, ..Default::default() });
        let model = open(WeightWidth::F32).expect("the real model loads");
        let stored = open(WeightWidth::Stored).expect("the real model loads at stored width");
        let reference = Reference::open(&testutil::fixtures().join("smollm2/reference.safetensors"));
        let direction = direction::Direction::load(&testutil::smollm2_direction()?, model.arch().hidden)
            .expect("the shared direction loads")
            .values;
        Some(Fixture { model, stored, reference, direction })
    })
    .as_ref()
}

/// Logits of the stored vocabulary subset, per prompt row.
fn subset(f: &Fixture, logits: &model::Forward) -> Vec<f32> {
    let (_, ids) = f.reference.i32("vocab_subset");
    (0..logits.rows()).flat_map(|r| ids.iter().map(move |&i| logits.row(r)[i as usize])).collect()
}

#[test]
fn last_position_logits_match_transformers_for_16_prompts() {
    let Some(f) = fixture() else { return };
    let prompts = f.reference.prompts("logits");
    assert_eq!(prompts.len(), 16);
    let out = f.model.forward(&Batch::new(&prompts).unwrap(), Logits::Last, &mut NoHook).unwrap();
    let got = subset(f, &out);
    let (_, want) = f.reference.f32("logits.subset");
    let diff = max_abs_diff(&got, want);
    // The bar: within 1e-3 of transformers (f32).
    assert!(diff <= 1e-3, "max |diff| over the vocabulary subset {diff}");
    let (_, top_ids) = f.reference.i32("logits.top_ids");
    let (_, top_values) = f.reference.f32("logits.top_values");
    let mut worst = 0f32;
    for r in 0..16 {
        for k in 0..32 {
            let (id, v) = (top_ids[r * 32 + k] as usize, top_values[r * 32 + k]);
            worst = worst.max((out.row(r)[id] - v).abs());
        }
        assert_eq!(model_argmax(out.row(r)), top_ids[r * 32] as usize, "prompt {r}: top token");
    }
    assert!(worst <= 1e-3, "max |diff| over the top-32 logits {worst}");
    eprintln!("logits: max |diff| {diff:.2e} (subset), {worst:.2e} (top 32)");
}

fn model_argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

#[test]
fn greedy_completions_match_transformers_for_10_chat_prompts() {
    let Some(f) = fixture() else { return };
    let prompts = f.reference.prompts("greedy");
    assert_eq!(prompts.len(), 10);
    let opts = GenerateOptions { max_new_tokens: 32, stop_tokens: vec![2] };
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 10];
    let got = f
        .model
        .generate(&Batch::new(&prompts).unwrap(), &opts, &mut NoHook, &mut |row, tok| {
            streamed[row].push(tok);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    let (_, want) = f.reference.i32("greedy.tokens");
    for (r, g) in got.iter().enumerate() {
        let want: Vec<u32> = want[r * 32..(r + 1) * 32].iter().filter(|&&t| t >= 0).map(|&t| t as u32).collect();
        assert_eq!(g.tokens, want, "prompt {r}");
        assert_eq!(streamed[r], g.tokens, "prompt {r}: streamed tokens");
        let stopped = want.last() == Some(&2);
        assert_eq!(g.finish, if stopped { model::Finish::Stop } else { model::Finish::Length }, "prompt {r}");
    }
}

/// Captures the residual entering every layer and after the last, for the last 6 positions.
fn residuals(
    f: &Fixture,
    prompts: &[Vec<u32>],
    interventions: Option<&mut Interventions>,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let layers = f.model.arch().layers;
    let sites =
        (0..layers).map(|layer| At { layer, site: Site::Input }).chain([At { layer: layers - 1, site: Site::Output }]);
    let mut capture = Capture::new(sites, Positions::Last(6));
    let out = match interventions {
        Some(i) => {
            let mut chain = Chain(vec![i, &mut capture]);
            f.model.forward(&Batch::new(prompts).unwrap(), Logits::Last, &mut chain).unwrap()
        }
        None => f.model.forward(&Batch::new(prompts).unwrap(), Logits::Last, &mut capture).unwrap(),
    };
    let mut per_site: Vec<Vec<f32>> =
        (0..layers).map(|layer| capture.take(At { layer, site: Site::Input }).unwrap()).collect();
    per_site.push(capture.take(At { layer: layers - 1, site: Site::Output }).unwrap());
    (per_site, subset(f, &out))
}

/// Worst `max |diff| / max |h|` over layers (the relative measure) against `{prefix}.residuals`.
fn worst_relative(f: &Fixture, got: &[Vec<f32>], prefix: &str) -> f32 {
    let (shape, want) = f.reference.f32(&format!("{prefix}.residuals"));
    let (prompts, sites, n, d) = (shape[0], shape[1], shape[2], shape[3]);
    assert_eq!(sites, got.len());
    let mut worst = 0f32;
    for (l, g) in got.iter().enumerate() {
        let mut w = Vec::with_capacity(prompts * n * d);
        for p in 0..prompts {
            w.extend_from_slice(&want[((p * sites + l) * n) * d..((p * sites + l) * n + n) * d]);
        }
        let rel = max_abs_diff(g, &w) / max_abs(&w);
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn residual_streams_match_transformers_plain_ablated_and_with_activation_addition() {
    let Some(f) = fixture() else { return };
    let prompts = f.reference.prompts("ablation");
    let layers = f.model.arch().layers;

    let (plain, plain_logits) = residuals(f, &prompts, None);
    let rel = worst_relative(f, &plain, "plain");
    assert!(rel <= 1e-5, "plain residuals: worst relative error {rel:.2e}");
    let d = max_abs_diff(&plain_logits, f.reference.f32("plain.logits").1);
    assert!(d <= 1e-3, "plain logits {d}");

    let mut ablation = Interventions::ablation(layers, &f.direction).unwrap();
    let (ablated, ablated_logits) = residuals(f, &prompts, Some(&mut ablation));
    let rel_ablated = worst_relative(f, &ablated, "ablation");
    // The bar: max |diff| / max |h| <= 1e-5 at each layer.
    assert!(rel_ablated <= 1e-5, "ablated residuals: worst relative error {rel_ablated:.2e}");
    let d_ablated = max_abs_diff(&ablated_logits, f.reference.f32("ablation.logits").1);
    assert!(d_ablated <= 1e-3, "ablated logits {d_ablated}");
    // Ablation leaves nothing along the direction at any layer.
    let norm = f.direction.iter().map(|v| v * v).sum::<f64>().sqrt();
    for (l, site) in ablated.iter().enumerate() {
        for row in site.chunks(f.model.arch().hidden) {
            let along: f64 = row.iter().zip(&f.direction).map(|(x, r)| *x as f64 * r / norm).sum();
            let scale = row.iter().map(|x| x.abs()).fold(0f32, f32::max) as f64;
            assert!(along.abs() <= 1e-5 * scale.max(1.0), "layer {l}: component {along} along the direction");
        }
    }

    let mut actadd = Interventions::activation_addition(layers, 15, &f.direction, 1.0).unwrap();
    let out = f.model.forward(&Batch::new(&prompts).unwrap(), Logits::Last, &mut actadd).unwrap();
    let d_actadd = max_abs_diff(&subset(f, &out), f.reference.f32("actadd.logits").1);
    assert!(d_actadd <= 1e-3, "activation addition logits {d_actadd}");
    eprintln!(
        "residuals: plain {rel:.2e}, ablated {rel_ablated:.2e} (relative); logits: plain {d:.2e}, ablated {d_ablated:.2e}, actadd {d_actadd:.2e}"
    );
}

#[test]
fn a_prompts_outputs_do_not_depend_on_its_batch() {
    let Some(f) = fixture() else { return };
    let prompts = f.reference.prompts("logits");
    let batch: Vec<Vec<u32>> = prompts[..6].to_vec();
    let together = f.model.forward(&Batch::new(&batch).unwrap(), Logits::Last, &mut NoHook).unwrap();
    let mut worst = 0f32;
    for (r, p) in batch.iter().enumerate() {
        let alone = f.model.forward(&Batch::new(&[p]).unwrap(), Logits::Last, &mut NoHook).unwrap();
        worst = worst.max(max_abs_diff(alone.row(0), together.row(r)));
    }
    // Only the matrix products' blocking changes with the row count.
    assert!(worst <= 1e-4, "max |diff| of logits alone vs batched {worst}");
    eprintln!("batch invariance: max |diff| {worst:.2e}");
}

#[test]
fn running_from_a_cached_residual_equals_the_full_pass() {
    let Some(f) = fixture() else { return };
    let prompts = f.reference.prompts("ablation");
    let batch = Batch::new(&prompts).unwrap();
    let layers = f.model.arch().layers;
    let l = 15;
    // method.md §5 prefix reuse: x^(l) from a plain pass, plus r, then layers l.. only.
    let mut capture = Capture::new([At { layer: l, site: Site::Input }], Positions::All);
    let plain = f.model.forward(&batch, Logits::Last, &mut capture).unwrap();
    let x = capture.take(At { layer: l, site: Site::Input }).unwrap();
    let mut actadd = Interventions::activation_addition(layers, l, &f.direction, 1.0).unwrap();
    let full = f.model.forward(&batch, Logits::Last, &mut actadd).unwrap();
    let mut actadd = Interventions::activation_addition(layers, l, &f.direction, 1.0).unwrap();
    let resumed = f.model.forward_from(l, x, &batch, Logits::Last, &mut actadd).unwrap();
    assert_eq!(resumed.logits, full.logits, "same kernels, same batch: bit for bit");
    assert_ne!(resumed.logits, plain.logits);
    // A hook that only reads changes nothing.
    let again = f.model.forward(&batch, Logits::Last, &mut NoHook).unwrap();
    assert_eq!(again.logits, plain.logits);
    // Last-position logits equal the last rows of all-position logits.
    let all = f.model.forward(&batch, Logits::All, &mut NoHook).unwrap();
    let ends: Vec<usize> = batch.segments().iter().map(|s| s.start + s.len - 1).collect();
    for (r, &e) in ends.iter().enumerate() {
        let d = max_abs_diff(all.row(e), plain.row(r));
        // The LM head runs on 2 rows or on all of them: gemm's blocking, so rounding, differs.
        assert!(d <= 1e-4, "prompt {r}: last row of all-position logits differs by {d}");
    }
}

/// bf16 weights held as bf16 are widened exactly inside each product: logits, ablated residuals and greedy
/// tokens are the same bits as with f32 weights (so every bar above holds at stored width too).
#[test]
fn stored_width_computes_the_same_bits_as_f32() {
    let Some(f) = fixture() else { return };
    let info = f.stored.weights_info();
    assert_eq!((info.width, info.dtypes.clone()), (WeightWidth::Stored, vec!["bf16"]));
    assert!(info.bytes * 2 <= info.f32_bytes + 1_000_000, "{info:?}");
    let prompts = f.reference.prompts("logits");
    let batch = Batch::new(&prompts).unwrap();
    let a = f.model.forward(&batch, Logits::Last, &mut NoHook).unwrap();
    let b = f.stored.forward(&batch, Logits::Last, &mut NoHook).unwrap();
    assert!(a.logits == b.logits, "logits differ by {}", max_abs_diff(&a.logits, &b.logits));
    let layers = f.model.arch().layers;
    let opts = GenerateOptions { max_new_tokens: 16, stop_tokens: vec![2] };
    let greedy = Batch::new(&f.reference.prompts("greedy")).unwrap();
    let run = |m: &Model| {
        let mut ablation = Interventions::ablation(layers, &f.direction).unwrap();
        m.generate(&greedy, &opts, &mut ablation, &mut |_, _| std::ops::ControlFlow::Continue(())).unwrap()
    };
    assert_eq!(run(&f.stored), run(&f.model), "ablated greedy tokens");
}
