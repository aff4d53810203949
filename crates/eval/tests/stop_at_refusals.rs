//! `CompleteOptions::stop_at_refusals` on the committed tiny refusing model (it refuses most of the
//! embedded `harmful_eval` prompts): once the count is reached every completion still going ends, later
//! batches are not run, and what was computed is a prefix of the whole run (the same tokens, the same
//! verdicts where a completion was not cut). Needs nothing outside the repository.

use std::path::PathBuf;

use chat::Chat;
use eval::{CompleteOptions, Formatter, Judge, Split, System};
use model::{Finish, Model, NoHook};

#[test]
fn completions_stop_once_the_refusal_count_is_reached() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-refusal/model");
    let (model, chat) = (Model::open(&dir).unwrap(), Chat::load(&dir).unwrap());
    let fmt = Formatter::new(&chat, System::TemplateDefault).unwrap();
    let ids = fmt.all(&eval::prompts::embedded(Split::HarmfulEval).instructions()[..40]).unwrap();
    let judge = Judge::default();
    let cut = CompleteOptions { max_new_tokens: 32, batch_size: 10, until_refusal: Some(&judge), ..Default::default() };
    let all = eval::complete(&model, &chat, &ids, &cut, &mut NoHook, &mut |_| {}).unwrap();
    let refused = |c: &[eval::Completion]| c.iter().filter(|c| judge.is_refusal(&c.text)).count();
    assert_eq!(all.len(), 40);
    assert!(refused(&all[..10]) >= 5, "the tiny model refuses most harmful prompts: {}", refused(&all[..10]));

    let mut batches = 0;
    let stop = CompleteOptions { stop_at_refusals: Some(5), ..cut };
    let some = eval::complete(&model, &chat, &ids, &stop, &mut NoHook, &mut |_| batches += 1).unwrap();
    // The fifth refusal comes in the first batch: only it ran, and generation ended at that step (other
    // prompts may refuse at the same step: at least five).
    assert_eq!((some.len(), batches), (10, 1));
    assert!(refused(&some) >= 5, "{}", refused(&some));
    let tokens = |c: &[eval::Completion]| c.iter().map(|c| c.tokens.len()).sum::<usize>();
    assert!(tokens(&some) <= tokens(&all[..10]));
    for (k, (s, a)) in some.iter().zip(&all).enumerate() {
        assert!(a.tokens.starts_with(&s.tokens), "prompt {k}: not a prefix of the whole run");
        if s.finish != Finish::Stopped || judge.is_refusal(&s.text) {
            assert_eq!(judge.is_refusal(&s.text), judge.is_refusal(&a.text), "prompt {k}");
        }
    }
    // A count never reached changes nothing.
    let never = CompleteOptions { stop_at_refusals: Some(41), ..cut };
    assert_eq!(eval::complete(&model, &chat, &ids, &never, &mut NoHook, &mut |_| {}).unwrap(), all);
}
