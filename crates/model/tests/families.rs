//! Conformance of every family's tiny fixture (`fixtures/models/<family>/{f32,bf16}`, 2 layers, hidden 64)
//! against transformers 4.57.1 in float32 (`fixtures/reference/<family>.safetensors`, described in
//! `fixtures/reference/README.md`): logits and the residual stream at every layer within 1e-4 max abs,
//! plain, with directional ablation and with activation addition; greedy tokens; a left-padded batch.
//! The bf16 and f32 fixtures hold the same values (the f32 ones are exactly bf16-representable), so both
//! are held to the same reference.

use model::{
    At, Batch, Capture, Chain, GenerateOptions, Hook, Interventions, LoadOptions, Logits, Model, NoHook, Positions,
    Site, WeightWidth,
};
use testutil::reference::{Reference, ids, max_abs_diff};

/// The bar for the fixtures: 1e-4 max abs (f32).
const TOL: f32 = 1e-4;

/// Runs the three reference prompts in one batch; returns all-position logits and the residual entering
/// every layer plus after the last, each `[tokens, d]` packed.
fn run(model: &Model, batch: &Batch, hook: Option<&mut dyn Hook>) -> (model::Forward, Vec<Vec<f32>>) {
    let layers = model.arch().layers;
    let sites = (0..layers)
        .map(|layer| At { layer, site: Site::Input })
        .chain([At { layer: layers - 1, site: Site::Output }])
        .collect::<Vec<_>>();
    let mut capture = Capture::new(sites.clone(), Positions::All);
    let out = match hook {
        Some(h) => model.forward(batch, Logits::All, &mut Chain(vec![h, &mut capture])),
        None => model.forward(batch, Logits::All, &mut capture),
    }
    .unwrap();
    (out, sites.iter().map(|&at| capture.take(at).unwrap()).collect())
}

/// Compares packed logits and residuals with `{logits}_{k}` `[n, V]` and `{hidden}_{k}` `[L+1, n, d]`.
fn compare(
    what: &str,
    r: &Reference,
    batch: &Batch,
    out: &model::Forward,
    hidden: &[Vec<f32>],
    logits: &str,
    hidden_name: Option<&str>,
) -> f32 {
    let mut worst = 0f32;
    for (k, seg) in batch.segments().iter().enumerate() {
        let (_, want) = r.f32(&format!("{logits}_{k}"));
        let got: Vec<f32> = seg.range().flat_map(|t| out.row(t).to_vec()).collect();
        let d = max_abs_diff(&got, want);
        assert!(d <= TOL, "{what}: `{logits}_{k}` max |diff| {d}");
        worst = worst.max(d);
        if let Some(h) = hidden_name {
            let (shape, want) = r.f32(&format!("{h}_{k}"));
            let (n, dim) = (shape[1], shape[2]);
            for (l, site) in hidden.iter().enumerate() {
                let got = &site[seg.start * dim..(seg.start + n) * dim];
                let d = max_abs_diff(got, &want[l * n * dim..(l + 1) * n * dim]);
                assert!(d <= TOL, "{what}: `{h}_{k}` row {l} max |diff| {d}");
                worst = worst.max(d);
            }
        }
    }
    worst
}

fn check(family: &str) {
    let r = Reference::open(&testutil::fixtures().join(format!("reference/{family}.safetensors")));
    let prompts: Vec<Vec<u32>> = (0..3).map(|k| ids(r.i32(&format!("input_ids_{k}")).1)).collect();
    let batch = Batch::new(&prompts).unwrap();
    let direction: Vec<f64> = r.f32("direction").1.iter().map(|&v| v as f64).collect();
    let actadd: Vec<f64> = r.f32("actadd_vector").1.iter().map(|&v| v as f64).collect();
    // Every fixture has f32; most also bf16 (`llama_bias` is f32 only).
    let dtypes =
        ["f32", "bf16"].into_iter().filter(|d| testutil::fixtures().join(format!("models/{family}/{d}")).is_dir());
    for dtype in dtypes {
        let what = format!("{family}/{dtype}");
        let dir = testutil::fixtures().join(format!("models/{family}/{dtype}"));
        let model = Model::open_with(&dir, LoadOptions { weights: WeightWidth::F32, ..Default::default() }).unwrap();
        let layers = model.arch().layers;

        let (out, hidden) = run(&model, &batch, None);
        let plain = compare(&what, &r, &batch, &out, &hidden, "logits", Some("hidden"));
        let out_plain = out;

        let mut ablation = Interventions::ablation(layers, &direction).unwrap();
        let (out, hidden) = run(&model, &batch, Some(&mut ablation));
        let ablated = compare(&what, &r, &batch, &out, &hidden, "logits_ablated", Some("hidden_ablated"));

        let mut add = Interventions::activation_addition(layers, 1, &actadd, 1.0).unwrap();
        let out = model.forward(&batch, Logits::All, &mut add).unwrap();
        let added = compare(&what, &r, &batch, &out, &[], "logits_actadd", None);

        // Greedy continuation without stopping (the reference never stops at EOS).
        let opts = GenerateOptions { max_new_tokens: 8, stop_tokens: vec![] };
        let generated =
            model.generate(&batch, &opts, &mut NoHook, &mut |_, _| std::ops::ControlFlow::Continue(())).unwrap();
        for (k, g) in generated.iter().enumerate() {
            assert_eq!(g.tokens, ids(r.i32(&format!("generated_{k}")).1), "{what}: greedy tokens of prompt {k}");
        }

        // transformers' left-padded batch (positions counted from each row's first real token).
        let (shape, padded) = r.i32("batch_input_ids");
        let (_, mask) = r.i32("batch_attention_mask");
        let mask: Vec<u8> = mask.iter().map(|&m| m as u8).collect();
        let from_padded = Batch::from_padded(&ids(padded), &mask, shape[0], shape[1]).unwrap();
        assert_eq!(from_padded, batch, "{what}: the padded batch holds the same prompts");
        let (_, want) = r.f32("batch_logits");
        let vocab = model.arch().vocab;
        let out = model.forward(&from_padded, Logits::All, &mut NoHook).unwrap();
        let mut batched = 0f32;
        for (row, seg) in from_padded.segments().iter().enumerate() {
            let pad = shape[1] - seg.len;
            for i in 0..seg.len {
                let w = &want[(row * shape[1] + pad + i) * vocab..][..vocab];
                batched = batched.max(max_abs_diff(out.row(seg.start + i), w));
            }
        }
        assert!(batched <= TOL, "{what}: padded batch logits max |diff| {batched}");

        // At stored width (bf16 stays bf16) the products widen the same values exactly: the same bits.
        let stored =
            Model::open_with(&dir, LoadOptions { weights: WeightWidth::Stored, ..Default::default() }).unwrap();
        let want_dtype = if dtype == "bf16" { "bf16" } else { "f32" };
        assert_eq!(stored.weights_info().dtypes, vec![want_dtype], "{what}: held dtypes");
        let info = stored.weights_info();
        assert_eq!(info.bytes, info.stored_bytes);
        assert!(if dtype == "bf16" { info.stored_bytes < info.f32_bytes } else { info.stored_bytes == info.f32_bytes });
        assert_eq!(stored.forward(&batch, Logits::All, &mut NoHook).unwrap(), out_plain, "{what}: stored width, plain");
        let mut ablation = Interventions::ablation(layers, &direction).unwrap();
        let gen_stored =
            stored.generate(&batch, &opts, &mut ablation, &mut |_, _| std::ops::ControlFlow::Continue(())).unwrap();
        let mut ablation = Interventions::ablation(layers, &direction).unwrap();
        let gen_f32 =
            model.generate(&batch, &opts, &mut ablation, &mut |_, _| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!(gen_stored, gen_f32, "{what}: stored width, ablated generation");
        eprintln!(
            "{what}: max |diff| plain {plain:.1e}, ablated {ablated:.1e}, actadd {added:.1e}, padded batch {batched:.1e}"
        );
    }
}

macro_rules! families {
    ($($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*
    };
}

families!(llama, llama_bias, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, mixtral, qwen2_moe, qwen3_moe);

/// Generation ends at a stop token (included, as transformers returns it) or when the caller asks.
#[test]
fn generation_stops_at_stop_tokens_and_when_asked() {
    use std::ops::ControlFlow;
    let r = Reference::open(&testutil::fixtures().join("reference/llama.safetensors"));
    let model = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let prompt = ids(r.i32("input_ids_0").1);
    let want = ids(r.i32("generated_0").1);
    let batch = Batch::new(&[prompt]).unwrap();
    let third = want[2];
    let first_third = want.iter().position(|&t| t == third).unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, stop_tokens: vec![third] };
    let g = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(g[0].tokens, want[..=first_third].to_vec());
    assert_eq!(g[0].finish, model::Finish::Stop);
    let opts = GenerateOptions { max_new_tokens: 8, stop_tokens: vec![] };
    let mut seen = 0;
    let g = model
        .generate(&batch, &opts, &mut NoHook, &mut |_, _| {
            seen += 1;
            if seen == 2 { ControlFlow::Break(model::Stop::All) } else { ControlFlow::Continue(()) }
        })
        .unwrap();
    assert_eq!((g[0].tokens.clone(), g[0].finish), (want[..2].to_vec(), model::Finish::Stopped));
    let opts = GenerateOptions { max_new_tokens: 0, stop_tokens: vec![] };
    let g = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(())).unwrap();
    assert!(g[0].tokens.is_empty());
    let opts = GenerateOptions { max_new_tokens: 1, stop_tokens: vec![512] };
    let e = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(())).unwrap_err();
    assert_eq!(e.to_string(), "stop token 512 is outside the vocabulary of 512 ids");
}

/// `Stop::Prompt` ends one prompt's generation after the token; the others go on with the tokens they
/// would have had.
#[test]
fn one_prompt_can_be_stopped_while_the_others_go_on() {
    use std::ops::ControlFlow;
    let r = Reference::open(&testutil::fixtures().join("reference/llama.safetensors"));
    let model = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let (p0, p1) = (ids(r.i32("input_ids_0").1), ids(r.i32("input_ids_1").1));
    let batch = Batch::new(&[p0, p1]).unwrap();
    let opts = GenerateOptions { max_new_tokens: 8, stop_tokens: vec![] };
    let all = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(())).unwrap();
    let mut seen = [0; 2];
    let cut = model
        .generate(&batch, &opts, &mut NoHook, &mut |row, _| {
            seen[row] += 1;
            if row == 0 && seen[0] == 3 { ControlFlow::Break(model::Stop::Prompt) } else { ControlFlow::Continue(()) }
        })
        .unwrap();
    assert_eq!((cut[0].tokens.clone(), cut[0].finish), (all[0].tokens[..3].to_vec(), model::Finish::Stopped));
    assert_eq!((cut[1].tokens.clone(), cut[1].finish), (all[1].tokens.clone(), model::Finish::Length));
    assert_eq!(seen, [3, 8]);
}
