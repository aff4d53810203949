//! The Jinja features chat templates use, rendered by us and by transformers' Jinja2 environment
//! (`fixtures/chat/templates/*.jinja`, expectations in `fixtures/chat/templates.json` made by
//! `fixtures/chat/make_reference.py`): text must be equal, and a template's own
//! `raise_exception` must come back as the same message.

use chat::{Clock, Ending, Error, Message, SpecialTokens, Template};
use serde_json::Value;

/// `make_reference.py` fixes transformers' clock at 2024-07-26 13:05:09.
const FIXED_NOW: i64 = 1_721_999_109;

fn reference() -> Value {
    let path = testutil::fixtures().join("chat/templates.json");
    serde_json::from_slice(&std::fs::read(&path).expect("fixtures/chat/templates.json exists")).expect("valid JSON")
}

fn messages(value: &Value) -> Vec<Message> {
    value
        .as_array()
        .expect("a conversation is a list")
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn special_tokens(value: &Value) -> SpecialTokens {
    let s = |k: &str| value.get(k).and_then(Value::as_str).map(str::to_string);
    SpecialTokens {
        bos_token: s("bos_token"),
        eos_token: s("eos_token"),
        unk_token: s("unk_token"),
        pad_token: s("pad_token"),
        additional_special_tokens: value["additional_special_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        ..SpecialTokens::default()
    }
}

#[test]
fn every_template_renders_as_transformers_does() {
    let reference = reference();
    let special = special_tokens(&reference["special_tokens"]);
    let conversations = &reference["conversations"];
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in reference["templates"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        let source = std::fs::read_to_string(testutil::fixtures().join("chat/templates").join(file)).unwrap();
        let template = Template::new(&source, file, Clock::Fixed(FIXED_NOW)).unwrap();
        for case in entry["cases"].as_array().unwrap() {
            let name = case["conversation"].as_str().unwrap();
            let ending = if case["add_generation_prompt"].as_bool().unwrap() {
                Ending::GenerationPrompt
            } else {
                Ending::LastMessage
            };
            let got = template.render(&messages(&conversations[name]), &special, ending);
            let ok = match (&got, case.get("text"), case.get("error")) {
                (Ok(text), Some(want), _) => text == want.as_str().unwrap(),
                (Err(Error::TemplateRaised { message, .. }), _, Some(want)) => message == want.as_str().unwrap(),
                _ => false,
            };
            if !ok {
                failures.push(format!("{file} / {name} / {ending:?}:\n  got  {got:?}\n  want {case}"));
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {checked} renders differ:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, 140);
}
