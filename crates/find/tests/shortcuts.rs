//! The shortcuts of method.md §5 against the exhaustive method, on tiny fixture models: the same choice
//! and, for every score the shortcut run computes, the exhaustive value to the bit (same batches). The
//! shared chat prefix (computed once, `eval::Prompts`) is the same computation: its scores agree with
//! whole-prompt runs to rounding and give the same choice.

use chat::Chat;
use find::{Found, Options, Rule, SelectOptions, Sets};
use model::Model;

fn run(family: &str, opts: &Options) -> Result<Found, String> {
    let dir = testutil::fixtures().join(format!("models/{family}/f32"));
    let (model, chat) = (Model::open(&dir).unwrap(), Chat::load(&dir).unwrap());
    find::find(&model, &chat, &Sets::embedded(), opts, &find::NoProgress).map_err(|e| e.to_string())
}

/// A random model gives its refusal token little probability (induce scores near -7): `min_induce` low
/// lets candidates pass, 0 with the relaxation exercises the last fallbacks.
fn options(family: &str, kl_max: f64, min_induce: f64) -> Options {
    let dir = testutil::fixtures().join(format!("models/{family}/f32"));
    let chat = Chat::load(&dir).unwrap();
    let refusal = chat.encode("I").unwrap();
    Options {
        // A random model does not refuse: keep every prompt, as the repo's filter switch does.
        filter: false,
        refusal_tokens: Some(refusal),
        select: SelectOptions {
            kl_max,
            min_induce,
            max_layer_fraction: 1.0,
            relax_induce: min_induce == 0.0,
            ..SelectOptions::default()
        },
        n_train: 24,
        n_val: 8,
        batch_size: 5,
        ..Options::default()
    }
}

fn outcome(r: &Result<Found, String>) -> Result<(i64, usize, Rule), String> {
    r.as_ref().map(|f| (f.choice.position, f.choice.layer, f.choice.rule.clone())).map_err(Clone::clone)
}

#[test]
fn shortcuts_give_the_exhaustive_choice_and_scores() {
    let mut rules = Vec::new();
    for family in ["llama", "qwen2", "gemma2"] {
        for (kl_max, min_induce) in [(0.1, -100.0), (1e-4, -100.0), (10.0, -100.0), (0.1, 0.0), (1e-4, 0.0)] {
            let opts = options(family, kl_max, min_induce);
            let short = run(family, &opts);
            let full = run(family, &Options { exhaustive: true, ..opts.clone() });
            assert_eq!(outcome(&short), outcome(&full), "{family}, kl_max {kl_max}, min_induce {min_induce}");
            let (Ok(short), Ok(full)) = (short, full) else { continue };
            rules.push(format!("{:?}", short.choice.rule));
            assert_eq!(short.candidates, full.candidates, "{family}: candidates");
            let mut computed = 0;
            for (s, f) in short.scores.iter().zip(&full.scores) {
                for (a, b) in [(s.kl, f.kl), (s.induce, f.induce), (s.bypass, f.bypass)] {
                    if let Some(a) = a {
                        assert_eq!(Some(a.to_bits()), b.map(f64::to_bits), "{family} ({}, {})", s.position, s.layer);
                        computed += 1;
                    }
                }
            }
            assert!(computed > 0);
            assert!(full.scores.iter().all(|s| s.kl.is_some() && s.induce.is_some() && s.bypass.is_some()));
        }
    }
    // The paper's rule, the fallback and the relaxations were all exercised.
    for rule in ["Filter", "MinKl", "RelaxedBypass", "RelaxedMinKl"] {
        assert!(rules.iter().any(|r| r.starts_with(rule)), "{rule} not exercised: {rules:?}");
    }
}

#[test]
fn the_shared_prefix_is_the_same_computation() {
    for family in ["llama", "gemma2", "qwen3"] {
        let opts = Options { exhaustive: true, ..options(family, 10.0, -100.0) };
        let shared = run(family, &opts).unwrap();
        let whole = run(family, &Options { share_prefix: false, ..opts.clone() }).unwrap();
        assert!(shared.shared_prefix_tokens > 0 && whole.shared_prefix_tokens == 0);
        assert_eq!(outcome(&Ok(shared.clone())), outcome(&Ok(whole.clone())), "{family}");
        for (a, b) in shared.candidates.iter().zip(&whole.candidates) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{family}: candidate value {a} vs {b}");
        }
        for (s, w) in shared.scores.iter().zip(&whole.scores) {
            for (a, b) in [(s.kl, w.kl), (s.induce, w.induce), (s.bypass, w.bypass)] {
                let (a, b) = (a.unwrap(), b.unwrap());
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{family} ({}, {}): {a} vs {b}", s.position, s.layer);
            }
        }
    }
}
