//! `abliterate generate` end to end: the real binary on the llama fixture (its chat template and
//! tokenizer) and on the real model, where the reply must be transformers' greedy reply token for
//! token (`fixtures/smollm2/reference.safetensors`). Interventions are checked against the library
//! running the same hooks, and every bad option against its exact message.

mod util;

use std::ops::ControlFlow;
use std::path::Path;

use checkpoint::{Dtype, safetensors};
use model::{Batch, GenerateOptions, Hook, Interventions, Model, NoHook};
use serde_json::Value;
use util::{abliterate, fixture};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What the library generates for the chat prompt `text` with a hook (the CLI must agree).
fn library_reply(dir: &Path, text: &str, max: usize, hook: &mut dyn Hook) -> Vec<u32> {
    let chat = chat::Chat::load(dir).unwrap();
    let ids = chat.prompt_ids(text, None).unwrap();
    let model = Model::open(dir).unwrap();
    let opts = GenerateOptions { max_new_tokens: max, stop_tokens: chat.eos_ids().to_vec() };
    let g = model.generate(&Batch::new(&[ids]).unwrap(), &opts, hook, &mut |_, _| ControlFlow::Continue(())).unwrap();
    g[0].tokens.clone()
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn tokens(v: &Value) -> Vec<u32> {
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[test]
fn json_reports_the_prompt_the_reply_and_how_it_ended() {
    let dir = fixture("models/llama/bf16");
    let r = abliterate(["generate", s(&dir), "--prompt", "Hello there", "--max-new-tokens", "6", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    let chat = chat::Chat::load(&dir).unwrap();
    let prompt: Vec<u32> = v["prompt_tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(prompt, chat.prompt_ids("Hello there", None).unwrap());
    let got = tokens(&v);
    assert_eq!(got, library_reply(&dir, "Hello there", 6, &mut NoHook));
    assert_eq!(v["text"], chat.decode(&got, chat::Special::Skip).unwrap());
    let stopped = chat.eos_ids().contains(got.last().unwrap());
    assert_eq!(v["finish"], if stopped { "stop" } else { "length" });
    assert!(stopped || got.len() == 6);
    assert_eq!(v["intervention"], Value::Null);
}

#[test]
fn the_reply_streams_to_stdout_with_a_summary_on_stderr() {
    let dir = fixture("models/llama/bf16");
    let r = abliterate(["generate", s(&dir), "--prompt", "Hello there", "--max-new-tokens", "6"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let chat = chat::Chat::load(&dir).unwrap();
    let want = library_reply(&dir, "Hello there", 6, &mut NoHook);
    assert_eq!(r.stdout, format!("{}\n", chat.decode(&want, chat::Special::Skip).unwrap()));
    assert!(r.stderr.starts_with(&format!("[{} new tokens, ", want.len())), "{}", r.stderr);
}

#[test]
fn ablate_and_add_run_the_paper_hooks() {
    let dir = fixture("models/llama/bf16");
    let direction = fixture("directions/llama.safetensors");
    let d = direction::Direction::load(&direction, 64).unwrap();
    let prompt = "Tell me a story";

    let r = abliterate([
        "generate",
        s(&dir),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
        "--ablate",
        s(&direction),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    assert_eq!(v["intervention"]["kind"], "ablate");
    assert_eq!(v["intervention"]["sha256"], d.sha256.as_str());
    let mut ablation = Interventions::ablation(2, &d.values).unwrap();
    assert_eq!(tokens(&v), library_reply(&dir, prompt, 8, &mut ablation));

    // --layer defaults to the direction file's `layer` metadata (1 here).
    let r = abliterate([
        "generate",
        s(&dir),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "8",
        "--add",
        s(&direction),
        "--coeff",
        "-4",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    assert_eq!((v["intervention"]["layer"].as_u64(), v["intervention"]["coeff"].as_f64()), (Some(1), Some(-4.0)));
    let mut add = Interventions::activation_addition(2, 1, &d.values, -4.0).unwrap();
    let added = tokens(&v);
    assert_eq!(added, library_reply(&dir, prompt, 8, &mut add));
    assert_ne!(added, library_reply(&dir, prompt, 8, &mut NoHook), "a large addition changes the reply");
}

#[test]
fn bad_options_are_errors_with_exit_code_2() {
    let dir = fixture("models/llama/bf16");
    let direction = fixture("directions/llama.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let no_layer = tmp.path().join("no-layer.safetensors");
    direction::write(&no_layer, &[1.0; 64], Dtype::F32, &Default::default()).unwrap();
    let short = tmp.path().join("short.safetensors");
    direction::write(&short, &[1.0; 8], Dtype::F32, &Default::default()).unwrap();

    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--add", s(&no_layer)]);
    assert_eq!(
        (r.code, r.stderr.trim_end()),
        (2, format!("error: --add needs --layer: direction file `{}` records no layer", no_layer.display()).as_str())
    );
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--add", s(&direction), "--layer", "2"]);
    assert_eq!((r.code, r.stderr.trim_end()), (2, "error: --layer 2 is out of range: the model has 2 layers (0..=1)"));
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--ablate", s(&short)]);
    assert_eq!(
        (r.code, r.stderr.trim_end()),
        (
            2,
            format!(
                "error: direction file `{}`: `direction` has length 8 but the model's hidden_size is 64",
                short.display()
            )
            .as_str()
        )
    );
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--ablate", s(&direction), "--add", s(&direction)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("'--ablate <FILE>' cannot be used with '--add <FILE>'"), "{}", r.stderr);
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--layer", "1"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--add <FILE>"), "{}", r.stderr);
}

/// transformers' greedy reply to the first greedy prompt of `fixtures/smollm2/make_reference.py`
/// (harmless_val[8], default system prompt of the template), 32 tokens at most.
#[test]
fn the_real_models_reply_is_transformers_greedy_reply() {
    let (Some(dir), Some(shared)) = (testutil::smollm2(), testutil::shared()) else { return };
    let splits = shared.join("datasets/refusal_direction/splits/harmless_val.json");
    let data: Value = serde_json::from_slice(&std::fs::read(splits).unwrap()).unwrap();
    let instruction = data[8]["instruction"].as_str().unwrap();
    let bytes = std::fs::read(fixture("smollm2/reference.safetensors")).unwrap();
    let header = safetensors::parse(&bytes).unwrap();
    let t = header.tensors.iter().find(|t| t.name == "greedy.tokens").unwrap();
    let raw = &bytes[header.data_start() + t.begin..header.data_start() + t.end];
    let want: Vec<u32> = raw
        .chunks_exact(4)
        .take(32)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .filter(|&v| v >= 0)
        .map(|v| v as u32)
        .collect();
    let r = abliterate(["generate", s(&dir), "--prompt", instruction, "--max-new-tokens", "32", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tokens(&json(&r.stdout)), want);
}

/// `--weights` and `--threads` change where the weights live and how many threads compute, never the
/// reply; the JSON says what was held.
#[test]
fn weights_and_threads_leave_the_reply_unchanged_and_are_reported() {
    let dir = fixture("models/llama/bf16");
    let run = |width: &str, threads: &str| {
        let r = abliterate([
            "generate",
            s(&dir),
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "6",
            "--weights",
            width,
            "--threads",
            threads,
            "--json",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        json(&r.stdout)
    };
    let f32 = run("f32", "2");
    let stored = run("stored", "1");
    assert_eq!(tokens(&f32), tokens(&stored));
    assert_eq!(tokens(&f32), library_reply(&dir, "Hello there", 6, &mut NoHook));
    assert_eq!((f32["weights"]["width"].as_str(), f32["weights"]["dtypes"][0].as_str()), (Some("f32"), Some("f32")));
    assert_eq!(
        (stored["weights"]["requested"].as_str(), stored["weights"]["dtypes"][0].as_str()),
        (Some("stored"), Some("bf16"))
    );
    assert!(stored["weights"]["bytes"].as_u64().unwrap() * 2 <= f32["weights"]["bytes"].as_u64().unwrap() + 4096);

    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--weights", "bf16"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("[possible values: f32, stored, auto]"), "{}", r.stderr);
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--threads", "0"]);
    assert_eq!(r.code, 2);
}

/// An absurd `--max-new-tokens` is an error naming the context length, not an allocation failure.
#[test]
fn max_new_tokens_beyond_the_context_is_an_error() {
    let dir = fixture("models/llama/bf16");
    let r = abliterate(["generate", s(&dir), "--prompt", "hi", "--max-new-tokens", "18446744073709551615"]);
    let chat = chat::Chat::load(&dir).unwrap();
    let n = chat.prompt_ids("hi", None).unwrap().len();
    assert_eq!(
        (r.code, r.stderr.trim_end()),
        (
            2,
            format!(
                "error: prompt 0 has {n} tokens; with 18446744073709551615 new tokens that is more than the model's \
                 context of 512 positions (max_position_embeddings)"
            )
            .as_str()
        )
    );
}
