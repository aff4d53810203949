//! The real test model (SmolLM2-135M-Instruct): our renders, token ids and decoded text equal
//! transformers' (`fixtures/chat/smollm2.json`, made by `fixtures/chat/make_reference.py` with
//! transformers 4.57.1), including a Unicode / emoji / whitespace-heavy text set. Only the tokenizer
//! and template files are needed: they are committed (`fixtures/smollm2/tokenizer/`), so these tests
//! run in every clone, without the model's weights.

use std::path::{Path, PathBuf};

use chat::{Chat, Ending, Error, Message, Options, Special};
use serde_json::Value;

fn model() -> Option<PathBuf> {
    Some(testutil::smollm2_tokenizer())
}

fn reference() -> Value {
    let path = testutil::fixtures().join("chat/smollm2.json");
    serde_json::from_slice(&std::fs::read(path).expect("fixtures/chat/smollm2.json exists")).expect("valid JSON")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().expect("a list of ids").iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

fn messages(value: &Value) -> Vec<Message> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Streams `ids` one at a time and joins the pieces.
fn streamed(chat: &Chat, ids: &[u32], special: Special) -> String {
    let mut stream = chat.stream(special);
    let mut text = String::new();
    for &id in ids {
        text.push_str(&stream.push(id).unwrap());
    }
    text + &stream.finish().unwrap()
}

#[test]
fn conversations_render_and_tokenize_as_transformers() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    let reference = reference();
    let cases = reference["conversations"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let name = format!("{} (add_generation_prompt={})", case["name"], case["add_generation_prompt"]);
        let ending = if case["add_generation_prompt"].as_bool().unwrap() {
            Ending::GenerationPrompt
        } else {
            Ending::LastMessage
        };
        let msgs = messages(&case["messages"]);
        assert_eq!(chat.render(&msgs, ending).unwrap(), case["text"].as_str().unwrap(), "{name}");
        assert_eq!(chat.encode_chat(&msgs, ending).unwrap(), ids(&case["ids"]), "{name}");
    }
}

#[test]
fn unicode_texts_tokenize_and_decode_as_transformers() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    let reference = reference();
    let texts = reference["texts"].as_array().unwrap();
    assert_eq!(texts.len(), 29);
    let mut tokens = 0;
    for case in texts {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(chat.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(chat.decode(&want, Special::Keep).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        assert_eq!(
            chat.decode(&want, Special::Skip).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{text:?}"
        );
        let chat_ids = ids(&case["chat_ids"]);
        assert_eq!(chat.prompt_ids(text, None).unwrap(), chat_ids, "{text:?}");
        assert_eq!(chat.decode(&chat_ids, Special::Keep).unwrap(), case["chat_decoded"].as_str().unwrap());
        assert_eq!(chat.decode(&chat_ids, Special::Skip).unwrap(), case["chat_decoded_skip_special"].as_str().unwrap());
        // Every prefix, so incomplete UTF-8 at the end decodes as transformers decodes it.
        for (k, prefix) in case["prefix_decoded"].as_array().unwrap().iter().enumerate() {
            assert_eq!(chat.decode(&want[..=k], Special::Keep).unwrap(), prefix.as_str().unwrap(), "{text:?} [..={k}]");
        }
        tokens += want.len();
    }
    assert!(tokens > 500, "{tokens} tokens checked");
}

#[test]
fn streamed_text_joins_to_the_decoded_text() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    let reference = reference();
    for case in reference["texts"].as_array().unwrap() {
        for key in ["ids", "chat_ids"] {
            let ids = ids(&case[key]);
            for special in [Special::Keep, Special::Skip] {
                assert_eq!(
                    streamed(&chat, &ids, special),
                    chat.decode(&ids, special).unwrap(),
                    "{} {key}",
                    case["text"]
                );
            }
        }
    }
    // SmolLM2 cleans up tokenization spaces, so " ," must not be streamed before the comma shows.
    let ids = chat.encode("Hi , you ' re here . Isn 't it ?").unwrap();
    let decoded = chat.decode(&ids, Special::Keep).unwrap();
    assert_eq!(decoded, "Hi, you're here. Isn 't it?");
    assert_eq!(streamed(&chat, &ids, Special::Keep), decoded);
}

#[test]
fn streaming_waits_for_a_whole_character() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    // The emoji is several byte-level tokens; nothing shows until the last one.
    let ids = chat.encode("🤖").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut stream = chat.stream(Special::Keep);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert!(pieces[..ids.len() - 1].iter().all(String::is_empty), "{pieces:?}");
    assert_eq!(pieces[ids.len() - 1], "🤖");
    assert_eq!(stream.finish().unwrap(), "");
}

#[test]
fn post_instruction_tokens_are_those_of_method_md() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    let eoi = chat.post_instruction().unwrap();
    // method.md §1: `<|im_end|>\n<|im_start|>assistant\n`, "assistant" split in two.
    assert_eq!(eoi.ids(), [2, 198, 1, 520, 9531, 198]);
    assert_eq!(eoi.text(), "<|im_end|>\n<|im_start|>assistant\n");
    let reference = reference();
    for case in reference["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        eoi.check(&chat.prompt_ids(text, None).unwrap(), text).unwrap();
        eoi.check(&chat.prompt_ids(text, Some("You are a terse assistant.")).unwrap(), text).unwrap();
    }
    // A prompt rendered without the generation prompt does not end with them.
    let ids = chat.encode_chat(&[Message::user("Hello")], Ending::LastMessage).unwrap();
    let err = eoi.check(&ids, "Hello").unwrap_err();
    assert!(matches!(&err, Error::PostInstructionMismatch { got, .. } if got[..] == ids[ids.len() - 6..]), "{err}");
}

#[test]
fn eos_and_pad_ids_match_transformers() {
    let Some(dir) = model() else { return };
    let chat = Chat::load(&dir).unwrap();
    let reference = reference();
    // generation_config.json says [2]; the tokenizer's eos `<|im_end|>` is 2 as well.
    assert_eq!(reference["generation_eos_token_id"], serde_json::json!([2]));
    assert_eq!(reference["eos_token_id"], 2);
    assert_eq!(chat.eos_ids(), [2]);
    assert_eq!(chat.pad_id() as u64, reference["pad_token_id"].as_u64().unwrap());
    let special = chat.special_tokens();
    assert_eq!(special.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(special.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(special.unk_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(special.pad_token.as_deref(), Some("<|im_end|>"));
}

/// A copy of the model's tokenizer files in a temp dir, with tokenizer_config.json edited.
fn tokenizer_dir(model: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for file in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(model.join(file), tmp.path().join(file)).unwrap();
    }
    let mut config: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(model.join("tokenizer_config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(tmp.path().join("tokenizer_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    tmp
}

#[test]
fn a_model_without_a_template_needs_a_template_file() {
    let Some(dir) = model() else { return };
    let original = Chat::load(&dir).unwrap();
    let template = original.render(&[Message::user("x")], Ending::GenerationPrompt).unwrap();
    let source = serde_json::from_slice::<Value>(&std::fs::read(dir.join("tokenizer_config.json")).unwrap()).unwrap()
        ["chat_template"]
        .as_str()
        .unwrap()
        .to_string();
    let tmp = tokenizer_dir(&dir, |c| {
        c.remove("chat_template");
    });
    let err = Chat::load(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` has no chat template (no `chat_template` in tokenizer_config.json and no chat_template.jinja); \
             refusal work needs a chat (instruction-tuned) model, or a chat template file supplied for this one",
            tmp.path().display()
        )
    );
    let file = tmp.path().join("my-template.jinja");
    std::fs::write(&file, &source).unwrap();
    let chat =
        Chat::load_with(tmp.path(), &Options { template_file: Some(file.clone()), ..Options::default() }).unwrap();
    assert_eq!(chat.render(&[Message::user("x")], Ending::GenerationPrompt).unwrap(), template);
    assert_eq!(chat.template().origin(), format!("`{}`", file.display()));
    assert_eq!(chat.post_instruction().unwrap().ids(), [2, 198, 1, 520, 9531, 198]);
}

#[test]
fn chat_template_jinja_wins_over_the_config_and_named_lists_use_default() {
    let Some(dir) = model() else { return };
    let tmp = tokenizer_dir(&dir, |c| {
        c.insert(
            "chat_template".into(),
            serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]),
        );
    });
    let chat = Chat::load(tmp.path()).unwrap();
    assert_eq!(chat.render(&[Message::user("x")], Ending::LastMessage).unwrap(), "D1");
    std::fs::write(tmp.path().join("chat_template.jinja"), "J{{ messages[0].content }}\n").unwrap();
    let chat = Chat::load(tmp.path()).unwrap();
    // The file's single trailing newline is dropped, as Jinja2 does by default.
    assert_eq!(chat.render(&[Message::user("x")], Ending::LastMessage).unwrap(), "Jx");

    let tmp = tokenizer_dir(&dir, |c| {
        c.insert(
            "chat_template".into(),
            serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]),
        );
    });
    assert_eq!(
        Chat::load(tmp.path()).unwrap_err().to_string(),
        format!(
            "`{}` has chat templates named `tool_use`, `rag` but none named `default`",
            tmp.path().join("tokenizer_config.json").display()
        )
    );
}

#[test]
fn template_errors_name_the_file_and_line() {
    let Some(dir) = model() else { return };
    let tmp = tokenizer_dir(&dir, |c| {
        c.insert("chat_template".into(), "{% for m in messages %}\n{{ m.content }}\n{% endfor %\n".into());
    });
    let config = tmp.path().join("tokenizer_config.json");
    let err = Chat::load(tmp.path()).unwrap_err();
    assert!(matches!(&err, Error::TemplateSyntax { line: Some(3), .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!("chat template from `{}`: syntax error at line 3: ", config.display())),
        "{err}"
    );

    let tmp = tokenizer_dir(&dir, |c| {
        c.insert(
            "chat_template".into(),
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok"
                .into(),
        );
    });
    let chat = Chat::load(tmp.path()).unwrap();
    assert_eq!(chat.render(&[Message::user("x")], Ending::LastMessage).unwrap(), "ok");
    let err = chat.prompt_ids("x", Some("sys")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "chat template from `{}` refused the conversation: System role not supported",
            tmp.path().join("tokenizer_config.json").display()
        )
    );

    let tmp = tokenizer_dir(&dir, |c| {
        c.insert("chat_template".into(), "a\n{{ strftime_now('%Q') }}".into());
    });
    let err = Chat::load(tmp.path()).unwrap().render(&[], Ending::LastMessage).unwrap_err();
    assert!(matches!(&err, Error::Render { line: Some(2), .. }), "{err:?}");
    assert!(err.to_string().contains("strftime_now: unsupported strftime directive `%Q`"), "{err}");
}

#[test]
fn missing_or_broken_files_are_named() {
    let Some(dir) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let err = Chat::load(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` not found: MODEL must be a Hugging Face model directory with the model's tokenizer",
            tmp.path().join("tokenizer.json").display()
        )
    );

    let tmp = tokenizer_dir(&dir, |_| {});
    std::fs::write(tmp.path().join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    let err = Chat::load(tmp.path()).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "`{}`: the tokenizer cannot be loaded: ",
            tmp.path().join("tokenizer.json").display()
        )),
        "{err}"
    );

    let tmp = tokenizer_dir(&dir, |c| {
        c.insert("eos_token".into(), serde_json::json!(7));
    });
    let err = Chat::load(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}`: `eos_token` must be a string, an object with `content`, or null",
            tmp.path().join("tokenizer_config.json").display()
        )
    );

    let tmp = tokenizer_dir(&dir, |_| {});
    std::fs::write(tmp.path().join("generation_config.json"), b"{\"eos_token_id\": [2, -1]}").unwrap();
    let err = Chat::load(tmp.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}`: `eos_token_id` has `-1`, which is not a token id",
            tmp.path().join("generation_config.json").display()
        )
    );
}

#[test]
fn eos_ids_join_generation_config_and_tokenizer() {
    let Some(dir) = model() else { return };
    let tmp = tokenizer_dir(&dir, |c| {
        c.insert("eos_token".into(), serde_json::json!({"content": "<|endoftext|>", "lstrip": false}));
        c.remove("pad_token");
    });
    std::fs::write(tmp.path().join("generation_config.json"), b"{\"eos_token_id\": [2, 5, 2]}").unwrap();
    let chat = Chat::load(tmp.path()).unwrap();
    assert_eq!(chat.eos_ids(), [2, 5, 0]);
    // No pad token: the tokenizer's eos pads.
    assert_eq!(chat.pad_id(), 0);
    std::fs::write(tmp.path().join("generation_config.json"), b"{\"eos_token_id\": 9}").unwrap();
    assert_eq!(Chat::load(tmp.path()).unwrap().eos_ids(), [9, 0]);
}

mod stream_property {
    use std::sync::OnceLock;

    use chat::{Chat, Special};
    use proptest::prelude::*;

    fn chat() -> Option<&'static Chat> {
        static CHAT: OnceLock<Option<Chat>> = OnceLock::new();
        CHAT.get_or_init(|| Some(Chat::load(&testutil::smollm2_tokenizer()).unwrap())).as_ref()
    }

    /// Tokens that stress the stream: clean-up patterns (` ,`, ` '`, `n't`, ...), spaces,
    /// pieces of multi-byte characters, special tokens.
    fn tricky(chat: &Chat) -> Vec<u32> {
        let mut pool = Vec::new();
        for text in [" , . ? ! ' 's 've 're 'm n't", " n ' t", "  \n\t", "🤖é你", "<|im_end|>", "a b c d"] {
            pool.extend(chat.encode(text).unwrap());
        }
        pool.sort_unstable();
        pool.dedup();
        pool
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn streamed_pieces_join_to_decode(picks in proptest::collection::vec((any::<bool>(), 0u32..49152, any::<prop::sample::Index>()), 0..40)) {
            let Some(chat) = chat() else { return Ok(()) };
            let pool = tricky(chat);
            let ids: Vec<u32> = picks.iter().map(|(random, id, i)| if *random { *id } else { pool[i.index(pool.len())] }).collect();
            for special in [Special::Keep, Special::Skip] {
                let mut stream = chat.stream(special);
                let mut text = String::new();
                for &id in &ids {
                    text.push_str(&stream.push(id).unwrap());
                }
                text.push_str(&stream.finish().unwrap());
                prop_assert_eq!(text, chat.decode(&ids, special).unwrap());
            }
        }
    }
}

#[test]
fn post_instruction_tokens_survive_case_changes_and_reject_ambiguity() {
    let Some(dir) = model() else { return };
    let with_template = |template: &str| {
        let template = template.to_string();
        let tmp = tokenizer_dir(&dir, move |c| {
            c.insert("chat_template".into(), template.into());
        });
        let chat = Chat::load(tmp.path()).unwrap();
        (tmp, chat)
    };
    // Upper-cased content is still found; the suffix follows it.
    let (_tmp, chat) = with_template("<|im_start|>{{ messages[0]['content'].upper() }}<|im_end|>\n");
    let eoi = chat.post_instruction().unwrap();
    assert_eq!(eoi.text(), "<|im_end|>");
    assert_eq!(eoi.ids(), [2]);

    let (tmp, chat) = with_template("{{ messages[0]['content'] }} / {{ messages[0]['content'] }}<|im_end|>");
    let config = tmp.path().join("tokenizer_config.json");
    assert_eq!(
        chat.post_instruction().unwrap_err().to_string(),
        format!(
            "chat template from `{}`: the instruction `xq zv placeholder` appears 2 times in the rendered prompt; it must appear once",
            config.display()
        )
    );
    let (tmp, chat) = with_template("<|im_start|>assistant\n");
    assert_eq!(
        chat.post_instruction().unwrap_err().to_string(),
        format!(
            "chat template from `{}`: the instruction `xq zv placeholder` does not appear in the rendered prompt",
            tmp.path().join("tokenizer_config.json").display()
        )
    );
    // " instruction" + "s" is one token " instructions": no clean boundary.
    let (_tmp, chat) = with_template("{{ messages[0]['content'] }}s<|im_end|>");
    assert_eq!(chat.encode(" instructions").unwrap().len(), 1);
    let err = chat.post_instruction().unwrap_err().to_string();
    assert!(err.contains("the token covering \" instructions\" spans the end of the instruction"), "{err}");
}

/// The Llama 3 and Qwen2 pre-tokenizer regexes (lookahead, case-insensitive groups, `\p{..}`
/// classes) split the Unicode text set as Python's tokenizers (Oniguruma) does. They run on
/// SmolLM2's vocabulary, the tokenizer.json rewritten as `make_reference.py` rewrites it.
#[test]
fn tiktoken_style_regexes_split_as_oniguruma_does() {
    let Some(dir) = model() else { return };
    let reference = reference();
    let texts: Vec<&str> = reference["texts"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap()).collect();
    let variants = reference["pre_tokenizer_variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    let json: Value = serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    for variant in variants {
        let mut json = json.clone();
        json["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": variant["regex"]}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]});
        if variant["nfc"].as_bool().unwrap() {
            json["normalizer"] = serde_json::json!({"type": "NFC"});
        }
        let tokenizer = chat::Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
        for (text, want) in texts.iter().zip(variant["ids"].as_array().unwrap()) {
            let got = tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
            assert_eq!(got, ids(want), "{} {text:?}", variant["name"]);
        }
    }
}
