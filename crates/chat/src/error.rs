//! The one error type of this crate. Every message names the file, template or prompt it is
//! about, so that a user knows what to fix.

use std::path::PathBuf;

/// Everything that can go wrong loading a tokenizer and chat template, rendering, or tokenizing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `cause`, not `source`: the message already includes it, and the CLI prints the whole chain.
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("`{}` not found: MODEL must be a Hugging Face model directory with the model's tokenizer", path.display())]
    NoTokenizer { path: PathBuf },
    #[error("`{}`: not valid JSON: {message}", path.display())]
    Json { path: PathBuf, message: String },
    #[error("`{}`: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("`{}`: the tokenizer cannot be loaded: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "`{}` has no chat template (no `chat_template` in tokenizer_config.json and no chat_template.jinja); \
         refusal work needs a chat (instruction-tuned) model, or a chat template file supplied for this one",
        dir.display()
    )]
    NoTemplate { dir: PathBuf },
    #[error(
        "`{}` has chat templates named {} but none named `default`",
        path.display(),
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
    )]
    NoDefaultTemplate { path: PathBuf, names: Vec<String> },
    #[error("chat template from {origin}: syntax error{}: {message}", at_line(*line))]
    TemplateSyntax { origin: String, line: Option<usize>, message: String },
    #[error("chat template from {origin} refused the conversation: {message}")]
    TemplateRaised { origin: String, message: String },
    #[error("chat template from {origin}: rendering failed{}: {message}", at_line(*line))]
    Render { origin: String, line: Option<usize>, message: String },
    #[error("tokenizing {what}: {message}")]
    Encode { what: String, message: String },
    #[error("decoding token ids: {message}")]
    Decode { message: String },
    #[error("chat template from {origin}: {problem}")]
    Placeholder { origin: String, problem: String },
    #[error(
        "prompt {prompt}: its last {} tokens {got:?} are not the post-instruction tokens {expected:?} of the chat template \
         (a token merged across the end of the instruction, or the prompt does not end with the generation prompt)",
        expected.len()
    )]
    PostInstructionMismatch { prompt: String, expected: Vec<u32>, got: Vec<u32> },
    #[error(
        "`{}` defines no end-of-turn token: neither generation_config.json nor config.json has `eos_token_id`, and tokenizer_config.json has no `eos_token` in the vocabulary",
        dir.display()
    )]
    NoEos { dir: PathBuf },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
