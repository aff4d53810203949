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
        let after = m.forward_after(&p, &rest, Logits::Last, &mut NoHook).unwrap();
        let diff = max_diff(&full.logits, &after.logits);
        assert!(diff <= 1e-5, "{family}: max |diff| {diff}");

        // Under directional ablation, capturing the last position of every layer's input.
        let mut ablate = Interventions::ablation(layers, &direction).unwrap();
        let mut cap_full = Capture::every_layer(layers, Site::Input, Positions::Last(1));
        let full =
            m.forward(&whole(&prefix, &rests), Logits::Last, &mut Chain(vec![&mut ablate, &mut cap_full])).unwrap();
        let p = m.prefix(&prefix, &mut ablate).unwrap();
        let mut cap_after = Capture::every_layer(layers, Site::Input, Positions::Last(1));
        let after = m.forward_after(&p, &rest, Logits::Last, &mut Chain(vec![&mut ablate, &mut cap_after])).unwrap();
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
        m.forward_after(&base, &rest, Logits::None, &mut cap).unwrap();
        let x1 = cap.take(At { layer: 1, site: Site::Input }).unwrap();
        assert_eq!(x1.len(), rest.tokens().len() * d, "the capture sees only the tokens after the prefix");
        let p = m.prefix(&prefix, &mut add).unwrap();
        let after = m.forward_after_from(&p, 1, x1, &rest, Logits::Last, &mut add).unwrap();
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
        e(m.forward_after_from(&p, 3, vec![0.0; 128], &rest, Logits::Last, &mut NoHook)),
        "cannot start at layer 3: the model has 2 layers"
    );
    assert_eq!(
        e(m.forward_after_from(&p, 1, vec![0.0; 5], &rest, Logits::Last, &mut NoHook)),
        "the residual has 5 values; 2 tokens x hidden size 64 need 128"
    );
    assert_eq!(m.prefix(&[], &mut NoHook).err().unwrap().to_string(), "prompt 0 has no tokens");
}
