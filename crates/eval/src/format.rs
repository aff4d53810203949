//! Instructions into token ids with the model's own chat template (`chat`), as users of the model see
//! them: a single user turn ending with the generation prompt, with a system prompt chosen by
//! [`System`]. Every prompt is checked to end with the template's post-instruction tokens (method.md §1),
//! since candidate directions are read at those positions counted from the end.
//!
//! **What "no system prompt" means.** Some templates (SmolLM2's, Qwen2.5's) insert a default system
//! prompt when the conversation has none. [`System::TemplateDefault`] keeps that (it is what users of the
//! model see, and what the reference run used). [`System::None`] means *no system turn at all*: the
//! template's own system turn is rendered with a marker, checked to be a clean prefix of the prompt, and
//! cut off, so the prompt starts with the user turn. For a template that adds no system prompt of its
//! own, or that has no system role, the two are the same. A template whose inserted system text cannot
//! be separated cleanly from the rest is an error for [`System::None`], never a silent default.
//!
//! Never runs a model and never writes a file.

use chat::{Chat, Ending, Message, PostInstruction};

use crate::{EvalError, Result};

/// Which system prompt a formatted prompt has.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "text", rename_all = "snake_case")]
pub enum System {
    /// No system message is passed: the template adds its default system prompt if it has one.
    TemplateDefault,
    /// No system turn at all (a template's default system prompt is removed).
    None,
    /// This system message.
    Text(String),
}

/// A marker rendered as a system message to find the template's system turn.
const MARKER: &str = "abliterate system marker";
/// The instruction rendered to show a prompt's template (`{instruction}` in [`Formatter::template`]).
const PLACEHOLDER: &str = "abliterate placeholder instruction";

/// Turns instructions into prompt token ids.
#[derive(Debug)]
pub struct Formatter<'a> {
    chat: &'a Chat,
    system: System,
    eoi: PostInstruction,
    /// The default system prompt the template inserts when given none, if it does.
    default_system: Option<String>,
    /// For [`System::None`] on a template with a default system prompt: the text of a marker system turn,
    /// cut from every prompt rendered with the marker.
    strip: Option<String>,
}

/// What rendering a lone marker system turn shows about the template: the text before the system
/// content (`A`), after it up to the next turn (`B`), and the template's default system text, if any.
struct SystemTurn {
    before: String,
    after: String,
    default_text: Option<String>,
}

fn system_turn(chat: &Chat) -> Result<Option<SystemTurn>> {
    let with = match chat.render(&[Message::system(MARKER), Message::user(PLACEHOLDER)], Ending::GenerationPrompt) {
        Ok(t) => t,
        // No system role (e.g. Gemma raises): there is no system turn to add or remove.
        Err(chat::Error::TemplateRaised { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(i) = with.find(MARKER) else { return Ok(None) };
    let before = &with[..i];
    let alone = match chat.render(&[Message::system(MARKER)], Ending::LastMessage) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let Some(after) = alone.strip_prefix(before).and_then(|t| t.strip_prefix(MARKER)) else { return Ok(None) };
    let turn = format!("{before}{MARKER}{after}");
    let Some(user_part) = with.strip_prefix(turn.as_str()) else { return Ok(None) };
    let plain = chat.render(&[Message::user(PLACEHOLDER)], Ending::GenerationPrompt)?;
    let default_text = plain
        .strip_suffix(user_part)
        .and_then(|x| x.strip_prefix(before))
        .and_then(|x| x.strip_suffix(after))
        .map(str::to_string);
    Ok(Some(SystemTurn { before: before.to_string(), after: after.to_string(), default_text }))
}

impl<'a> Formatter<'a> {
    /// A formatter for `chat` with the given system prompt choice.
    pub fn new(chat: &'a Chat, system: System) -> Result<Formatter<'a>> {
        let eoi = chat.post_instruction()?;
        let turn = system_turn(chat)?;
        let default_system = turn.as_ref().and_then(|t| t.default_text.clone());
        let strip = match (&system, &turn) {
            (System::None, Some(t)) if default_system.is_some() => Some(format!("{}{MARKER}{}", t.before, t.after)),
            (System::None, None) => {
                // Either no system role, or a structure we cannot see into: make sure nothing is inserted.
                let plain = chat.render(&[Message::user(PLACEHOLDER)], Ending::GenerationPrompt)?;
                let start = plain.find(PLACEHOLDER).unwrap_or(0);
                if plain[..start].to_lowercase().contains("system") {
                    return Err(EvalError::Format(format!(
                        "the chat template from {} adds a system turn that cannot be separated from the prompt, so \
                         there is no way to render it without one; use the template's default or --system TEXT",
                        chat.template().origin()
                    )));
                }
                None
            }
            _ => None,
        };
        Ok(Formatter { chat, system, eoi, default_system, strip })
    }

    /// The prompt text of one instruction.
    pub fn text(&self, instruction: &str) -> Result<String> {
        let text = match (&self.system, &self.strip) {
            (System::Text(s), _) => {
                self.chat.render(&[Message::system(s), Message::user(instruction)], Ending::GenerationPrompt)?
            }
            (System::None, Some(turn)) => {
                let with = self
                    .chat
                    .render(&[Message::system(MARKER), Message::user(instruction)], Ending::GenerationPrompt)?;
                with.strip_prefix(turn.as_str())
                    .ok_or_else(|| {
                        EvalError::Format(format!(
                            "the chat template from {} renders the system turn differently for instruction {:?}, so it \
                             cannot be removed",
                            self.chat.template().origin(),
                            short(instruction)
                        ))
                    })?
                    .to_string()
            }
            _ => self.chat.render(&[Message::user(instruction)], Ending::GenerationPrompt)?,
        };
        Ok(text)
    }

    /// The token ids of one instruction's prompt, checked to end with the post-instruction tokens.
    pub fn ids(&self, instruction: &str) -> Result<Vec<u32>> {
        let ids = self.chat.encode(&self.text(instruction)?)?;
        self.eoi.check(&ids, instruction)?;
        Ok(ids)
    }

    /// The token ids of many instructions, in order (tokenized in parallel).
    pub fn all<S: AsRef<str> + Sync>(&self, instructions: &[S]) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        instructions.par_iter().map(|i| self.ids(i.as_ref())).collect()
    }

    /// The prompt template as text, `{instruction}` where the instruction goes (as the reference's
    /// `prompts.json` records it).
    pub fn template(&self) -> Result<String> {
        Ok(self.text(PLACEHOLDER)?.replacen(PLACEHOLDER, "{instruction}", 1))
    }

    /// The system prompt choice.
    pub fn system(&self) -> &System {
        &self.system
    }

    /// The system prompt the template inserts when given none, if it has one.
    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// The system prompt the formatted prompts actually contain.
    pub fn effective_system(&self) -> Option<&str> {
        match &self.system {
            System::TemplateDefault => self.default_system(),
            System::None => None,
            System::Text(t) => Some(t),
        }
    }

    /// The template's post-instruction tokens.
    pub fn post_instruction(&self) -> &PostInstruction {
        &self.eoi
    }

    pub fn chat(&self) -> &Chat {
        self.chat
    }
}

pub(crate) fn short(text: &str) -> String {
    const MAX: usize = 48;
    let mut out: String = text.chars().take(MAX).collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}
