//! `cargo xtask distill MODEL IN.json OUT.jsonl [--max-new-tokens N] [--batch N]`: greedy chat replies of
//! a model to a list of prompts, batched on our own runtime, written as JSON lines
//! (`{"instruction", "completion", "finish"}`, in the order of IN). It makes the harmless answers the tiny
//! refusing model of `fixtures/tiny-refusal` is trained on (its `make_data.py` calls it), so that data is
//! reproducible from committed scripts and our runtime alone.
//!
//! IN is a JSON array of strings or of objects with an `instruction` field. The model's own chat template
//! (with its default system prompt, if it adds one) wraps each prompt. Generation is greedy and stops at
//! the model's end-of-turn ids, so the output does not depend on the batch size or thread count. OUT is
//! written to a temporary file beside it and renamed when complete; IN is only read.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use chat::{Chat, Special};
use model::{Batch, Finish, GenerateOptions, Model, NoHook};
use serde_json::{Value, json};

const USAGE: &str = "usage: cargo xtask distill MODEL IN.json OUT.jsonl [--max-new-tokens N] [--batch N]";

pub fn run(args: &[&str]) -> Result<()> {
    let mut positional = Vec::new();
    let (mut max_new_tokens, mut batch_size) = (64usize, 32usize);
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        match a {
            "--max-new-tokens" => max_new_tokens = number(it.next(), a)?,
            "--batch" => batch_size = number(it.next(), a)?.max(1),
            _ if a.starts_with("--") => bail!("unknown option `{a}`\n{USAGE}"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [model_dir, input, output] = positional.as_slice() else { bail!("{USAGE}") };

    let prompts = read_prompts(input)?;
    let chat = Chat::load(model_dir)?;
    let model = Model::open(model_dir)?;
    let opts = GenerateOptions { max_new_tokens, stop_tokens: chat.eos_ids().to_vec() };

    let tmp = output.with_extension("jsonl.partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?,
    );
    let start = Instant::now();
    let mut new_tokens = 0usize;
    for (b, chunk) in prompts.chunks(batch_size).enumerate() {
        let ids = chunk.iter().map(|p| chat.prompt_ids(p, None)).collect::<chat::Result<Vec<_>>>()?;
        let batch = Batch::new(&ids)?;
        let replies = model.generate(&batch, &opts, &mut NoHook, &mut |_, _| ControlFlow::Continue(()))?;
        for (prompt, reply) in chunk.iter().zip(&replies) {
            new_tokens += reply.tokens.len();
            let finish = match reply.finish {
                Finish::Stop => "stop",
                Finish::Length => "length",
                Finish::Stopped => "stopped",
            };
            let text = chat.decode(&reply.tokens, Special::Skip)?;
            let line = json!({"instruction": prompt, "completion": text.trim(), "finish": finish});
            writeln!(out, "{line}")?;
        }
        let done = (b * batch_size + chunk.len()).min(prompts.len());
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{done}/{} prompts, {new_tokens} new tokens, {:.0} tokens/s",
            prompts.len(),
            new_tokens as f64 / secs
        );
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, output)
        .with_context(|| format!("cannot rename `{}` to `{}`", tmp.display(), output.display()))?;
    Ok(())
}

fn number(value: Option<&&str>, option: &str) -> Result<usize> {
    let v = value.with_context(|| format!("`{option}` needs a value\n{USAGE}"))?;
    v.parse().with_context(|| format!("`{option}` takes a whole number, not `{v}`"))
}

fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", path.display()))?;
    let Value::Array(rows) = value else { bail!("`{}` is not a JSON array", path.display()) };
    rows.iter()
        .enumerate()
        .map(|(i, row)| match row {
            Value::String(s) => Ok(s.clone()),
            Value::Object(m) => match m.get("instruction") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => bail!("`{}`: entry {i} has no string `instruction`", path.display()),
            },
            _ => bail!("`{}`: entry {i} is neither a string nor an object", path.display()),
        })
        .collect()
}
