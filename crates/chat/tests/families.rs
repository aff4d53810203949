//! Every fixture family's real chat template (`fixtures/models/<family>/bf16`): renders and
//! token ids equal transformers' (`fixtures/reference/chat/<family>.json`, made by
//! `fixtures/reference/make_reference.py`), including the templates' own errors; and the
//! post-instruction tokens are the template's suffix, last in every prompt.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chat::{Chat, Ending, Error, Message, Options};
use serde_json::Value;

struct Family {
    name: String,
    reference: Value,
    dir: PathBuf,
}

fn families() -> Vec<Family> {
    let mut out = Vec::new();
    let folder = testutil::fixtures().join("reference/chat");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        let reference: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let dir = testutil::workspace_root().join(reference["model"].as_str().unwrap());
        out.push(Family { name: reference["family"].as_str().unwrap().to_string(), reference, dir });
    }
    out
}

fn messages(value: &Value) -> Vec<Message> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn load(family: &Family, kwargs: &Value) -> Chat {
    let template_vars = kwargs.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Chat::load_with(&family.dir, &Options { template_vars, ..Options::default() }).unwrap()
}

#[test]
fn every_family_renders_and_tokenizes_as_transformers() {
    let families = families();
    let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gemma",
            "gemma2",
            "gemma3",
            "llama",
            "mistral",
            "mixtral",
            "phi3",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe"
        ]
    );
    let mut checked = 0;
    let mut failures = Vec::new();
    for family in &families {
        let mut chats: BTreeMap<String, Chat> = BTreeMap::new();
        for case in family.reference["cases"].as_array().unwrap() {
            let chat = chats.entry(case["kwargs"].to_string()).or_insert_with(|| load(family, &case["kwargs"]));
            let ending = if case["add_generation_prompt"].as_bool().unwrap() {
                Ending::GenerationPrompt
            } else {
                Ending::LastMessage
            };
            let label = format!("{} / {} / {ending:?} / {}", family.name, case["name"], case["kwargs"]);
            let msgs = messages(&case["messages"]);
            match (chat.render(&msgs, ending), case.get("text"), case.get("error")) {
                (Ok(text), Some(want), _) if text == want.as_str().unwrap() => {
                    let ids: Vec<u64> =
                        chat.encode_chat(&msgs, ending).unwrap().iter().map(|&i| u64::from(i)).collect();
                    let want_ids: Vec<u64> =
                        case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
                    if ids != want_ids {
                        failures.push(format!("{label}: ids\n  got  {ids:?}\n  want {want_ids:?}"));
                    }
                }
                (Err(Error::TemplateRaised { message, .. }), _, Some(want)) if message == want.as_str().unwrap() => {}
                (got, _, _) => failures.push(format!("{label}:\n  got  {got:?}\n  want {case}")),
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cases differ:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, 126);
}

#[test]
fn post_instruction_tokens_of_every_family() {
    // The text after the instruction in each family's template (method.md §1).
    let want: BTreeMap<&str, &str> = BTreeMap::from([
        ("gemma", "<end_of_turn>\n<start_of_turn>model\n"),
        ("gemma2", "<end_of_turn>\n<start_of_turn>model\n"),
        ("gemma3", "<end_of_turn>\n<start_of_turn>model\n"),
        ("llama", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("mistral", "[/INST]"),
        ("mixtral", " [/INST]"),
        ("phi3", "<|end|>\n<|assistant|>\n"),
        ("qwen2", "<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen2_moe", "<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen3", "<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen3_moe", "<|im_end|>\n<|im_start|>assistant\n"),
    ]);
    let prompts = ["Hello", "  spaces around  ", "Ends with a newline\n", "émoji 🤖 and 中文", "How do I pick a lock?"];
    for family in families() {
        let chat = Chat::load(&family.dir).unwrap();
        let eoi = chat.post_instruction().unwrap();
        assert_eq!(eoi.text(), want[family.name.as_str()], "{}", family.name);
        // In context they are the suffix tokenized on its own, as the paper's code computes them.
        assert_eq!(eoi.ids(), chat.encode(eoi.text()).unwrap(), "{}", family.name);
        for prompt in prompts {
            eoi.check(&chat.prompt_ids(prompt, None).unwrap(), prompt).unwrap();
        }
    }
}

#[test]
fn qwen3_without_thinking_ends_with_an_empty_think_block() {
    let family = families().into_iter().find(|f| f.name == "qwen3").unwrap();
    let chat = load(&family, &serde_json::json!({"enable_thinking": false}));
    let eoi = chat.post_instruction().unwrap();
    assert_eq!(eoi.text(), "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    eoi.check(&chat.prompt_ids("Hello", None).unwrap(), "Hello").unwrap();
}

#[test]
fn special_tokens_eos_and_pad_of_every_family() {
    for family in families() {
        let chat = Chat::load(&family.dir).unwrap();
        let special = chat.special_tokens();
        let text = |v: &Value| v.as_str().map(str::to_string);
        assert_eq!(special.bos_token, text(&family.reference["bos_token"]), "{}", family.name);
        assert_eq!(special.eos_token, text(&family.reference["eos_token"]), "{}", family.name);
        assert_eq!(special.pad_token, text(&family.reference["pad_token"]), "{}", family.name);
        let id = |t: &Option<String>| chat.tokenizer().token_to_id(t.as_deref().unwrap()).unwrap();
        assert_eq!(chat.pad_id(), id(&special.pad_token), "{}", family.name);
        // generation_config.json's ids first (an int or a list), then the tokenizer's eos.
        let generation: Value =
            serde_json::from_slice(&std::fs::read(family.dir.join("generation_config.json")).unwrap()).unwrap();
        let mut want: Vec<u32> = match &generation["eos_token_id"] {
            Value::Array(ids) => ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            v => vec![v.as_u64().unwrap() as u32],
        };
        if !want.contains(&id(&special.eos_token)) {
            want.push(id(&special.eos_token));
        }
        assert_eq!(chat.eos_ids(), want, "{}", family.name);
    }
}
