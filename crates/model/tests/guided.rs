//! Guided generation (`Model::generate_guided`): teacher-forcing a guess of each continuation and
//! generating only where the model's greedy choice leaves it gives the generations of
//! `Model::generate_after` (tokens, finish, first logits, log-probabilities), whatever the guides, and scores
//! the guides as `Model::continuation_logprobs` does. Every family's fixture, plain and under ablation.

use std::ops::ControlFlow;

use model::{Batch, Finish, GenerateOptions, Generation, Interventions, Model, NoHook, Record, Stop};

const FAMILIES: [&str; 8] = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral"];

fn prompts() -> (Vec<u32>, Vec<Vec<u32>>) {
    let prefix: Vec<u32> = vec![5, 17, 200, 33, 9, 71];
    let rests = vec![vec![40, 41, 42, 43, 44, 45, 46], vec![7], vec![300, 301, 302], vec![12, 13]];
    (prefix, rests)
}

fn go(_: usize, _: u32) -> ControlFlow<Stop> {
    ControlFlow::Continue(())
}

/// The same generations; bit for bit where the runtime is batch invariant (a forced row and a step are then
/// the same computation), else the tokens and values within rounding.
fn assert_same(what: &str, got: &[Generation], want: &[Generation]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!((&g.tokens, g.finish), (&w.tokens, w.finish), "{what}: prompt {k}");
        if model::batch_invariant() {
            assert_eq!(g.first_logits, w.first_logits, "{what}: first logits of {k}");
            assert_eq!(g.logprobs, w.logprobs, "{what}: log-probabilities of {k}");
        } else {
            assert_eq!(g.first_logits.len(), w.first_logits.len());
            assert!(g.first_logits.iter().zip(&w.first_logits).all(|(a, b)| (a - b).abs() <= 1e-5), "{what}: {k}");
            assert_eq!(g.logprobs.len(), w.logprobs.len());
            assert!(g.logprobs.iter().zip(&w.logprobs).all(|(a, b)| (a - b).abs() <= 1e-4), "{what}: {k}");
        }
    }
}

#[test]
fn guided_generation_equals_generation_whatever_the_guides() {
    let (prefix, rests) = prompts();
    for family in FAMILIES {
        let m = Model::open(&testutil::fixtures().join(format!("models/{family}/f32"))).unwrap();
        let (layers, d, vocab) = (m.arch().layers, m.arch().hidden, m.arch().vocab as u32);
        let direction: Vec<f64> = (0..d).map(|i| ((i * 5 % 11) as f64 - 5.0) / 2.0).collect();
        let rest = Batch::new(&rests).unwrap();
        let record = Record { first_logits: true, logprobs: true };
        let opts = GenerateOptions { max_new_tokens: 7, stop_tokens: vec![] };
        // The plain model's generations: a guide that is right everywhere for it, and a plausible guess
        // (another model's answer) for the model under ablation.
        let plain_p = m.prefix(&prefix, &mut NoHook).unwrap();
        let plain = m.generate_after(Some(&plain_p), &rest, &opts, record, &mut NoHook, &mut go).unwrap();
        let plain_tokens: Vec<Vec<u32>> = plain.iter().map(|g| g.tokens.clone()).collect();
        for ablated in [false, true] {
            let mut hook: Box<dyn model::Hook> =
                if ablated { Box::new(Interventions::ablation(layers, &direction).unwrap()) } else { Box::new(NoHook) };
            let p = m.prefix(&prefix, hook.as_mut()).unwrap();
            let want = m.generate_after(Some(&p), &rest, &opts, record, hook.as_mut(), &mut go).unwrap();
            let tokens: Vec<Vec<u32>> = want.iter().map(|g| g.tokens.clone()).collect();
            // Right for two tokens, then wrong; wrong from the start and longer than max_new_tokens.
            let off: Vec<Vec<u32>> =
                tokens.iter().map(|t| [&t[..2], &[(t[2] + 1) % vocab, t[3], t[4]]].concat()).collect();
            let wrong: Vec<Vec<u32>> =
                tokens.iter().map(|t| (0..9).map(|i| (t[0] + 1 + i) % vocab).collect()).collect();
            let cases: [(&str, Vec<Vec<u32>>); 6] = [
                ("its own", tokens.clone()),
                ("empty", vec![vec![]; rests.len()]),
                ("off after two", off),
                ("wrong and long", wrong),
                ("the plain model's", plain_tokens.clone()),
                ("mixed", vec![tokens[0][..3].to_vec(), vec![], vec![1], tokens[3].clone()]),
            ];
            for (name, guides) in cases {
                let what = format!("{family} ablated={ablated}, guides {name}");
                let (got, scored) =
                    m.generate_guided(Some(&p), &rest, &guides, &opts, record, hook.as_mut(), &mut go).unwrap();
                assert_same(&what, &got, &want);
                let forced = m.continuation_logprobs(Some(&p), &rest, &guides, hook.as_mut()).unwrap();
                assert_eq!(
                    scored.iter().map(Vec::len).collect::<Vec<_>>(),
                    guides.iter().map(Vec::len).collect::<Vec<_>>()
                );
                if model::batch_invariant() {
                    assert_eq!(scored, forced, "{what}: scores");
                } else {
                    let worst = scored.iter().flatten().zip(forced.iter().flatten()).map(|(a, b)| (a - b).abs());
                    assert!(worst.fold(0f64, f64::max) <= 1e-4, "{what}: scores");
                }
            }
        }

        // Stop tokens and a caller that ends a prompt end guided generations at the same tokens.
        let stop = plain_tokens[0][2];
        let opts = GenerateOptions { max_new_tokens: 7, stop_tokens: vec![stop] };
        let stop_after = |row: usize, seen: &mut Vec<Vec<u32>>, t: u32| {
            seen[row].push(t);
            if row == 2 && seen[row].len() == 3 { ControlFlow::Break(Stop::Prompt) } else { ControlFlow::Continue(()) }
        };
        let mut seen_want = vec![Vec::new(); rests.len()];
        let want = m
            .generate_after(Some(&plain_p), &rest, &opts, record, &mut NoHook, &mut |r, t| {
                stop_after(r, &mut seen_want, t)
            })
            .unwrap();
        assert_eq!(want[0].finish, Finish::Stop, "{family}: the stop token ends prompt 0");
        if !plain_tokens[2][..3].contains(&stop) {
            assert_eq!((want[2].finish, want[2].tokens.len()), (Finish::Stopped, 3), "{family}");
        }
        let mut seen = vec![Vec::new(); rests.len()];
        let (got, _) = m
            .generate_guided(Some(&plain_p), &rest, &plain_tokens, &opts, record, &mut NoHook, &mut |r, t| {
                stop_after(r, &mut seen, t)
            })
            .unwrap();
        assert_same(&format!("{family}: stops"), &got, &want);
        assert_eq!(seen, seen_want, "{family}: every token is shown to the caller, in order");

        // Stop::All ends every prompt where it is.
        let opts = GenerateOptions { max_new_tokens: 7, stop_tokens: vec![] };
        let (got, _) = m
            .generate_guided(Some(&plain_p), &rest, &plain_tokens, &opts, record, &mut NoHook, &mut |r, _| {
                if r == 1 { ControlFlow::Break(Stop::All) } else { ControlFlow::Continue(()) }
            })
            .unwrap();
        assert_eq!(got[0].tokens, plain_tokens[0], "{family}: prompt 0 was guided to its end first");
        assert_eq!((got[1].tokens.len(), got[1].finish), (1, Finish::Stopped), "{family}");
        for g in &got[2..] {
            assert_eq!((g.tokens.len(), g.finish), (0, Finish::Stopped), "{family}: not reached");
        }
    }
}

#[test]
fn guided_generation_checks_its_inputs() {
    let m = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let rest = Batch::new(&[vec![5, 6], vec![7]]).unwrap();
    let opts = GenerateOptions { max_new_tokens: 3, stop_tokens: vec![] };
    let v = m.arch().vocab as u32;
    let e = |guides: &[Vec<u32>], opts: &GenerateOptions| {
        m.generate_guided(None, &rest, guides, opts, Record::default(), &mut NoHook, &mut go).unwrap_err().to_string()
    };
    assert_eq!(e(&[vec![1]], &opts), "1 continuations for a batch of 2 prompts");
    assert_eq!(e(&[vec![1], vec![v]], &opts), format!("continuation token {v} is outside the vocabulary of {v} ids"));
    let bad_stop = GenerateOptions { max_new_tokens: 3, stop_tokens: vec![v] };
    assert_eq!(e(&[vec![1], vec![2]], &bad_stop), format!("stop token {v} is outside the vocabulary of {v} ids"));
    // No new tokens: nothing generated, the guides still scored.
    let none = GenerateOptions { max_new_tokens: 0, stop_tokens: vec![] };
    let (gens, scored) =
        m.generate_guided(None, &rest, &[vec![1, 2], vec![]], &none, Record::default(), &mut NoHook, &mut go).unwrap();
    assert!(gens.iter().all(|g| g.tokens.is_empty() && g.finish == Finish::Length));
    assert_eq!(scored.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 0]);
}
