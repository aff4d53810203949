//! Teacher-forced cross-entropy against transformers: the fixtures' reference logits
//! (`fixtures/reference/<family>.safetensors`, made by transformers 4.57.1 in float32) give the loss of
//! each reference sequence's continuation independently of our forward pass; ours must agree, plain and
//! under directional ablation.

use model::{Interventions, Model, NoHook};
use testutil::reference::{Reference, ids};

/// The loss of tokens `split..` of each sequence from the reference's all-position logits, in f64.
fn reference_ce(r: &Reference, logits: &str, seqs: &[Vec<u32>], split: usize) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (k, s) in seqs.iter().enumerate() {
        let (shape, z) = r.f32(&format!("{logits}_{k}"));
        let v = shape[1];
        for i in split..s.len() {
            let row = &z[(i - 1) * v..i * v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            sum += lse - row[s[i] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn cross_entropy_matches_transformers_logits() {
    for family in ["llama", "qwen2", "gemma2", "phi3", "mixtral"] {
        let r = Reference::open(&testutil::fixtures().join(format!("reference/{family}.safetensors")));
        let seqs: Vec<Vec<u32>> = (0..3).map(|k| ids(r.i32(&format!("input_ids_{k}")).1)).collect();
        let split = 3;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            seqs.iter().map(|s| (s[..split].to_vec(), s[split..].to_vec())).collect();
        let model = Model::open(&testutil::fixtures().join(format!("models/{family}/f32"))).unwrap();
        let mut calls = Vec::new();
        let plain = verify::cross_entropy(&model, &mut NoHook, &pairs, 2, &mut |d| calls.push(d)).unwrap();
        assert_eq!(calls, vec![2, 3]);
        let want = reference_ce(&r, "logits", &seqs, split);
        assert!((plain.ce - want).abs() < 1e-4, "{family}: {} vs transformers {want}", plain.ce);
        assert_eq!((plain.tokens, plain.sequences), (2 + 6 + 10, 3));
        assert!((plain.perplexity - plain.ce.exp()).abs() < 1e-12);

        let direction: Vec<f64> = r.f32("direction").1.iter().map(|&v| v as f64).collect();
        let mut ablate = Interventions::ablation(model.arch().layers, &direction).unwrap();
        let ablated = verify::cross_entropy(&model, &mut ablate, &pairs, 8, &mut |_| {}).unwrap();
        let want = reference_ce(&r, "logits_ablated", &seqs, split);
        assert!((ablated.ce - want).abs() < 1e-4, "{family} ablated: {} vs transformers {want}", ablated.ce);
    }
}

#[test]
fn empty_continuations_are_skipped_and_empty_prompts_refused() {
    let model = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let pairs = vec![(vec![5, 6], vec![]), (vec![5, 6], vec![7, 8])];
    let l = verify::cross_entropy(&model, &mut NoHook, &pairs, 4, &mut |_| {}).unwrap();
    assert_eq!((l.tokens, l.sequences), (2, 1));
    let e = verify::cross_entropy(&model, &mut NoHook, &[(vec![], vec![1])], 4, &mut |_| {}).unwrap_err();
    assert_eq!(e.to_string(), "cross-entropy: prompt 0 has no tokens");
    let e = verify::cross_entropy(&model, &mut NoHook, &[(vec![1], vec![])], 4, &mut |_| {}).unwrap_err();
    assert_eq!(e.to_string(), "cross-entropy: every continuation is empty");
}
