//! The tokenizer and chat template of a Hugging Face chat model, applied exactly as transformers
//! applies them: rendered text and token ids equal `tokenizer.apply_chat_template(messages,
//! add_generation_prompt=..., tokenize=True)` (which tokenizes without adding special tokens),
//! and decoded text equals `tokenizer.decode(ids, skip_special_tokens=...)`.
//!
//! ```no_run
//! use chat::{Chat, Ending, Message, Special};
//! # fn main() -> chat::Result<()> {
//! let chat = Chat::load(std::path::Path::new("models/smollm2"))?;
//! // A single-turn prompt, ready for the model to answer (what `find` and `verify` feed it).
//! let ids = chat.prompt_ids("How do I bake bread?", None)?;
//! // The template tokens after the instruction (method.md §1), checked on every prompt.
//! let eoi = chat.post_instruction()?;
//! eoi.check(&ids, "How do I bake bread?")?;
//! // Any conversation, with or without the generation prompt.
//! let text = chat.render(&[Message::system("Be brief."), Message::user("Hi")], Ending::GenerationPrompt)?;
//! // Generation: stop ids, left-padding id, and streamed text.
//! let stop: &[u32] = chat.eos_ids();
//! let pad: u32 = chat.pad_id();
//! let mut stream = chat.stream(Special::Skip);
//! for id in [19556, 17] {
//!     print!("{}", stream.push(id)?);
//! }
//! print!("{}", stream.finish()?);
//! # Ok(()) }
//! ```
//!
//! Files read from the model directory: `tokenizer.json` (required), `tokenizer_config.json`
//! (special tokens, `chat_template`), `chat_template.jinja` (preferred over the config's
//! template, as in transformers), the legacy `special_tokens_map.json`, and
//! `generation_config.json` / `config.json` for end-of-turn ids. A model without a chat template
//! is an error unless [`Options::template_file`] supplies one: refusal work needs a chat model.
//!
//! Where this differs from transformers (deliberately, or where Jinja2 and minijinja differ):
//!
//! - messages are `{role, content}` with string content; `tools` and `documents` are always
//!   `none` (no tool use), extra variables come from [`Options::template_vars`];
//! - `strftime_now` formats UTC, not the local time (a fixed [`Clock`] makes renders
//!   reproducible);
//! - some Jinja2 errors do not happen here (iterating over `none` renders nothing, as in the
//!   `tool_use` templates that fail in transformers without tools); minijinja's own error texts
//!   differ from Jinja2's, but a template's `raise_exception(msg)` comes back as `msg` verbatim.
//!
//! Tested against transformers 4.57.1 on the real SmolLM2 model (renders, ids, decoding of
//! Unicode-heavy text), on every fixture family's template and tokenizer, and on ten templates
//! written to exercise one Jinja feature each (`fixtures/chat/`).
//!
//! This crate never runs a model and never writes a file.

mod config;
mod eoi;
mod error;
mod pyjson;
mod stream;
mod strftime;
mod template;
mod tokenizer;

use std::path::{Path, PathBuf};

pub use eoi::PostInstruction;
pub use error::{Error, Result};
pub use stream::TextStream;
pub use template::{Clock, SpecialTokens, Template};
pub use tokenizers::Tokenizer;

use config::{CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TokenizerConfig};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }

    pub fn system(content: &str) -> Message {
        Message::new("system", content)
    }

    pub fn user(content: &str) -> Message {
        Message::new("user", content)
    }

    pub fn assistant(content: &str) -> Message {
        Message::new("assistant", content)
    }
}

/// How a rendered conversation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With the assistant's header, ready for the model to answer
    /// (`add_generation_prompt=True`).
    GenerationPrompt,
    /// Right after the last message (`add_generation_prompt=False`).
    LastMessage,
}

/// Whether decoding writes special tokens (`<|im_end|>`, ...) as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Keep,
    /// `skip_special_tokens=True`.
    Skip,
}

/// How to load a model's chat setup.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A Jinja chat template file to use instead of the model's own (required for a model that
    /// has none).
    pub template_file: Option<PathBuf>,
    /// The clock of the template's `strftime_now`.
    pub clock: Clock,
    /// Extra template variables, as keyword arguments of `apply_chat_template`
    /// (`("enable_thinking", false)` for Qwen3).
    pub template_vars: Vec<(String, serde_json::Value)>,
}

/// A model's tokenizer, chat template and generation ids.
#[derive(Debug)]
pub struct Chat {
    tokenizer: Tokenizer,
    template: Template,
    special: SpecialTokens,
    clean_up_spaces: bool,
    eos_ids: Vec<u32>,
    pad_id: u32,
}

/// The chat template of a model directory, as [`Chat::load`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundTemplate {
    /// The file it comes from, relative to the model directory: `chat_template.jinja` (preferred)
    /// or `tokenizer_config.json`.
    pub file: &'static str,
    /// With a named list in tokenizer_config.json, every name (the `default` one is used).
    pub names: Vec<String>,
    pub text: String,
}

/// Where [`Chat::load`] takes the chat template of `dir` from, and its text: the one definition
/// of template discovery (`inspect` reports it). `Ok(None)`: the model has no template.
pub fn template(dir: &Path) -> Result<Option<FoundTemplate>> {
    find_template(dir, &TokenizerConfig::read(dir)?)
}

fn find_template(dir: &Path, config: &TokenizerConfig) -> Result<Option<FoundTemplate>> {
    let jinja = dir.join(CHAT_TEMPLATE_FILE);
    if let Some(bytes) = config::read_optional(&jinja)? {
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Invalid { path: jinja, problem: "not UTF-8 text".to_string() })?;
        return Ok(Some(FoundTemplate { file: CHAT_TEMPLATE_FILE, names: Vec::new(), text }));
    }
    let names = match &config.chat_template {
        Some(serde_json::Value::Array(list)) => {
            list.iter().filter_map(|t| t.get("name").and_then(serde_json::Value::as_str).map(str::to_string)).collect()
        }
        _ => Vec::new(),
    };
    Ok(config.default_template()?.map(|text| FoundTemplate { file: TOKENIZER_CONFIG_FILE, names, text }))
}

impl Chat {
    /// Loads the tokenizer and chat template of the model directory `dir`.
    pub fn load(dir: &Path) -> Result<Chat> {
        Chat::load_with(dir, &Options::default())
    }

    /// [`Chat::load`] with options (a template file, a fixed clock).
    pub fn load_with(dir: &Path, options: &Options) -> Result<Chat> {
        let config = TokenizerConfig::read(dir)?;
        let tokenizer = tokenizer::load(dir, &config)?;
        let (source, origin) = match &options.template_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|cause| Error::Io { path: path.clone(), cause })?;
                (text, format!("`{}`", path.display()))
            }
            None => match find_template(dir, &config)? {
                Some(found) => {
                    let origin = format!("`{}`", dir.join(found.file).display());
                    (found.text, origin)
                }
                None => return Err(Error::NoTemplate { dir: dir.to_path_buf() }),
            },
        };
        let mut template = Template::new(&source, &origin, options.clock)?;
        for (name, value) in &options.template_vars {
            template.set_var(name, value);
        }

        let special = config.special.clone();
        let id_of = |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut eos_ids = config::generation_eos_ids(dir)?;
        if let Some(id) = id_of(&special.eos_token)
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        let mut seen = Vec::with_capacity(eos_ids.len());
        eos_ids.retain(|id| {
            let new = !seen.contains(id);
            seen.push(*id);
            new
        });
        let Some(&first_eos) = eos_ids.first() else {
            return Err(Error::NoEos { dir: dir.to_path_buf() });
        };
        let pad_id = id_of(&special.pad_token).or_else(|| id_of(&special.eos_token)).unwrap_or(first_eos);
        Ok(Chat { clean_up_spaces: config.clean_up_tokenization_spaces, tokenizer, template, special, eos_ids, pad_id })
    }

    /// Renders a conversation as text.
    pub fn render(&self, messages: &[Message], ending: Ending) -> Result<String> {
        self.template.render(messages, &self.special, ending)
    }

    /// Tokenizes text as `apply_chat_template` does: no special tokens are added (a BOS the
    /// model needs is part of the template's text).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode_fast(text, false).map_err(|e| Error::Encode {
            what: format!("{} characters of text", text.chars().count()),
            message: e.to_string(),
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Renders and tokenizes a conversation.
    pub fn encode_chat(&self, messages: &[Message], ending: Ending) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, ending)?)
    }

    /// The token ids of a single-turn prompt (an optional system message, the user's
    /// instruction) ending with the generation prompt.
    pub fn prompt_ids(&self, instruction: &str, system: Option<&str>) -> Result<Vec<u32>> {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(instruction));
        self.encode_chat(&messages, Ending::GenerationPrompt)
    }

    /// The template's post-instruction tokens (method.md §1).
    pub fn post_instruction(&self) -> Result<PostInstruction> {
        eoi::find(self)
    }

    /// Text of token ids, as transformers' `decode(ids, skip_special_tokens=...)` (with the
    /// model's `clean_up_tokenization_spaces`). Ids outside the vocabulary are skipped, as there.
    pub fn decode(&self, ids: &[u32], special: Special) -> Result<String> {
        Ok(self.clean(&self.decode_raw(ids, special)?))
    }

    /// A decoder for text streamed as ids are generated.
    pub fn stream(&self, special: Special) -> TextStream<'_> {
        TextStream::new(self, special)
    }

    /// Ids that end generation: generation_config.json's `eos_token_id` (an int or a list; or
    /// config.json's where there is no generation_config.json), then the tokenizer's
    /// `eos_token`, without repeats. Never empty.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The id to left-pad batches with: the tokenizer's `pad_token`, else its `eos_token`,
    /// else the first end-of-turn id. Padded positions must be masked; the id only has to exist.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The special tokens the template sees.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub(crate) fn cleans_up_spaces(&self) -> bool {
        self.clean_up_spaces
    }

    pub(crate) fn decode_raw(&self, ids: &[u32], special: Special) -> Result<String> {
        self.tokenizer.decode(ids, special == Special::Skip).map_err(|e| Error::Decode { message: e.to_string() })
    }

    pub(crate) fn clean(&self, text: &str) -> String {
        if self.clean_up_spaces { tokenizer::clean_up_tokenization(text) } else { text.to_string() }
    }
}
