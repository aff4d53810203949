//! A shared prefix run once (`Model::prefix`) and prompts run after it (`Model::forward_after`,
//! `forward_after_from`) give the logits and residuals of the whole prompts, with and without hooks, on
//! every family's fixture (sliding windows, soft-capping, MoE, q/k norms included).

use model::{At, Batch, Capture, Chain, Interventions, Logits, Model, NoHook, Positions, Site};

const FAMILIES: [&str; 8] = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral"];

fn prompts() -> (Vec<u32>, Vec<Vec<u32>>) {
    let prefix: Vec<u32> = vec![5, 17, 200, 33, 9, 71];
    let rests = vec![vec![40, 41, 42, 43, 44, 45, 46], vec![7], vec![300, 301, 302]];
    (prefix, rests)
}

fn whole(prefix: &[u32], rests: &[Vec<u32>]) -> Batch {
    let full: Vec<Vec<u32>> = rests.iter().map(|r| [prefix, r].concat()).collect();
    Batch::new(&full).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn prompts_after_a_prefix_equal_the_whole_prompts() {
    let (prefix, rests) = prompts();
    for family in FAMILIES {
        let m = Model::open(&testutil::fixtures().join(format!("models/{family}/f32"))).unwrap();
        let (layers, d) = (m.arch().layers, m.arch().hidden);
        let direction: Vec<f64> = (0..d).map(|i| ((i * 7 % 13) as f64 - 6.0) / 3.0).collect();
        let full = m.forward(&whole(&prefix, &rests), Logits::Last, &mut NoHook).unwrap();
        let rest = Batch::new(&rests).unwrap();
        let p = m.prefix(&prefix, &mut NoHook).unwrap();
        let after = m.forward_after(Some(&p), &rest, Logits::Last, &mut NoHook).unwrap();
        let diff = max_diff(&full.logits, &after.logits);
        assert!(diff <= 1e-5, "{family}: max |diff| {diff}");

        // Under directional ablation, capturing the last position of every layer's input.
        let mut ablate = Interventions::ablation(layers, &direction).unwrap();
        let mut cap_full = Capture::every_layer(layers, Site::Input, Positions::Last(1));
        let full =
            m.forward(&whole(&prefix, &rests), Logits::Last, &mut Chain(vec![&mut ablate, &mut cap_full])).unwrap();
        let p = m.prefix(&prefix, &mut ablate).unwrap();
        let mut cap_after = Capture::every_layer(layers, Site::Input, Positions::Last(1));
        let after =
            m.forward_after(Some(&p), &rest, Logits::Last, &mut Chain(vec![&mut ablate, &mut cap_after])).unwrap();
        assert!(max_diff(&full.logits, &after.logits) <= 1e-5, "{family}: ablation");
        for l in 0..layers {
            let at = At { layer: l, site: Site::Input };
            assert!(max_diff(cap_full.get(at).unwrap(), cap_after.get(at).unwrap()) <= 1e-5, "{family}: layer {l}");
        }

        // Activation addition at layer 1, resumed from the cached residual entering it.
        let mut add = Interventions::activation_addition(layers, 1, &direction, 1.0).unwrap();
        let full = m.forward(&whole(&prefix, &rests), Logits::Last, &mut add).unwrap();
        let mut cap = Capture::new([At { layer: 1, site: Site::Input }], Positions::All);
        let base = m.prefix(&prefix, &mut NoHook).unwrap();
        m.forward_after(Some(&base), &rest, Logits::None, &mut cap).unwrap();
        let x1 = cap.take(At { layer: 1, site: Site::Input }).unwrap();
        assert_eq!(x1.len(), rest.tokens().len() * d, "the capture sees only the tokens after the prefix");
        let p = m.prefix(&prefix, &mut add).unwrap();
        let after = m.forward_after_from(Some(&p), 1, x1, &rest, Logits::Last, &mut add).unwrap();
        assert!(max_diff(&full.logits, &after.logits) <= 1e-5, "{family}: activation addition from layer 1");
    }
}

#[test]
fn forward_after_from_checks_its_inputs() {
    let m = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let p = m.prefix(&[1, 2, 3], &mut NoHook).unwrap();
    assert_eq!(p.tokens(), &[1, 2, 3]);
    let rest = Batch::new(&[vec![4, 5]]).unwrap();
    let e = |r: model::Result<model::Forward>| r.unwrap_err().to_string();
    assert_eq!(
        e(m.forward_after_from(Some(&p), 3, vec![0.0; 128], &rest, Logits::Last, &mut NoHook)),
        "cannot start at layer 3: the model has 2 layers"
    );
    assert_eq!(
        e(m.forward_after_from(Some(&p), 1, vec![0.0; 5], &rest, Logits::Last, &mut NoHook)),
        "the residual has 5 values; 2 tokens x hidden size 64 need 128"
    );
    assert_eq!(m.prefix(&[], &mut NoHook).err().unwrap().to_string(), "prompt 0 has no tokens");
}

/// Greedy generation after a shared prefix gives the tokens of generating the whole prompts; the first
/// logits it records are the prompts' last-position logits; the log-probabilities it records for the chosen
/// tokens equal teacher forcing of those tokens (`continuation_logprobs`) and an independent log-softmax of
/// an all-position forward pass over prompt + continuation. Plain and under directional ablation.
#[test]
fn generation_after_a_prefix_and_teacher_forcing_agree_with_whole_prompts() {
    use model::{GenerateOptions, Record};
    use std::ops::ControlFlow;
    let (prefix, rests) = prompts();
    for family in FAMILIES {
        let m = Model::open(&testutil::fixtures().join(format!("models/{family}/f32"))).unwrap();
        let (layers, d, vocab) = (m.arch().layers, m.arch().hidden, m.arch().vocab);
        let direction: Vec<f64> = (0..d).map(|i| ((i * 5 % 11) as f64 - 5.0) / 2.0).collect();
        for ablated in [false, true] {
            let mut hook: Box<dyn model::Hook> =
                if ablated { Box::new(Interventions::ablation(layers, &direction).unwrap()) } else { Box::new(NoHook) };
            let opts = GenerateOptions { max_new_tokens: 6, stop_tokens: vec![] };
            let go = &mut |_: usize, _: u32| ControlFlow::Continue(());
            let want = m.generate(&whole(&prefix, &rests), &opts, hook.as_mut(), go).unwrap();
            let p = m.prefix(&prefix, hook.as_mut()).unwrap();
            let rest = Batch::new(&rests).unwrap();
            let record = Record { first_logits: true, logprobs: true };
            let got = m.generate_after(Some(&p), &rest, &opts, record, hook.as_mut(), go).unwrap();
            let last = m.forward(&whole(&prefix, &rests), Logits::Last, hook.as_mut()).unwrap();
            let conts: Vec<Vec<u32>> = got.iter().map(|g| g.tokens.clone()).collect();
            let forced = m.continuation_logprobs(Some(&p), &rest, &conts, hook.as_mut()).unwrap();
            for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.tokens, g.tokens, "{family} {ablated}: prompt {k}");
                assert!(w.first_logits.is_empty() && w.logprobs.is_empty(), "nothing recorded unless asked");
                assert!(max_diff(&g.first_logits, last.row(k)) <= 1e-5, "{family} {ablated}: first logits {k}");
                if model::batch_invariant() {
                    assert_eq!(g.first_logits, last.row(k), "{family} {ablated}: first logits {k}, bit for bit");
                }
                // Independent: log-softmax in f64 of an all-position pass over the whole sequence.
                let seq = [&prefix[..], &rests[k], &g.tokens[..g.tokens.len() - 1]].concat();
                let all =
                    m.forward(&Batch::new(std::slice::from_ref(&seq)).unwrap(), Logits::All, hook.as_mut()).unwrap();
                let start = prefix.len() + rests[k].len() - 1;
                for (i, &t) in g.tokens.iter().enumerate() {
                    let z = all.row(start + i);
                    assert_eq!(z.len(), vocab);
                    let lse = z.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
                    let want = z[t as usize] as f64 - lse;
                    for (what, v) in [("generation", g.logprobs[i]), ("teacher forcing", forced[k][i])] {
                        assert!((v - want).abs() <= 1e-4, "{family} {ablated}: {what} token {i} of {k}: {v} vs {want}");
                    }
                    if model::batch_invariant() {
                        // The same token's logits from a generation step and from teacher forcing.
                        assert_eq!(g.logprobs[i], forced[k][i], "{family} {ablated}: token {i} of {k}");
                    }
                }
            }
        }
    }
}

#[test]
fn teacher_forcing_checks_its_inputs() {
    let m = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let rest = Batch::new(&[vec![5, 6]]).unwrap();
    let e = |r: Result<Vec<Vec<f64>>, model::ModelError>| r.unwrap_err().to_string();
    assert_eq!(e(m.continuation_logprobs(None, &rest, &[], &mut NoHook)), "0 continuations for a batch of 1 prompts");
    let v = m.arch().vocab as u32;
    assert_eq!(
        e(m.continuation_logprobs(None, &rest, &[vec![1, v]], &mut NoHook)),
        format!("continuation token {v} is outside the vocabulary of {v} ids")
    );
    // An empty continuation scores nothing; a one-token one only the prompt's prediction.
    let out = m.continuation_logprobs(None, &rest, &[vec![]], &mut NoHook).unwrap();
    assert_eq!(out, vec![Vec::<f64>::new()]);
    let out = m.continuation_logprobs(None, &rest, &[vec![7]], &mut NoHook).unwrap();
    assert_eq!(out[0].len(), 1);
    assert!(out[0][0] < 0.0);
}
