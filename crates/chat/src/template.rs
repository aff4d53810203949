//! A model's Jinja chat template, rendered with minijinja the way transformers renders it with
//! Jinja2 (`transformers.utils.chat_template_utils`, 4.57): `trim_blocks` and `lstrip_blocks`
//! on, loop controls, the variables `messages`, `add_generation_prompt`, `tools` and
//! `documents` (both `none`) and the special tokens, and the helpers `raise_exception`,
//! `tojson` (Python's `json.dumps`, no HTML escaping) and `strftime_now`. Python string and
//! dict methods (`strip`, `split`, `items`, `get`, ...) come from minijinja-contrib's pycompat;
//! values print as Python's `str()` does (`None`, `True`).
//!
//! This module only turns messages into text; it never tokenizes.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};
use crate::pyjson::{self, JsonStyle};
use crate::{Ending, Message};

/// The special tokens a template sees as variables (`bos_token`, `eos_token`, ...), as
/// transformers' `special_tokens_map` has them: the token text, only those that are set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
}

impl SpecialTokens {
    /// The single-token attributes by their template variable name.
    pub fn named(&self) -> [(&'static str, Option<&str>); 7] {
        [
            ("bos_token", self.bos_token.as_deref()),
            ("eos_token", self.eos_token.as_deref()),
            ("unk_token", self.unk_token.as_deref()),
            ("sep_token", self.sep_token.as_deref()),
            ("pad_token", self.pad_token.as_deref()),
            ("cls_token", self.cls_token.as_deref()),
            ("mask_token", self.mask_token.as_deref()),
        ]
    }
}

/// What `strftime_now` reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Clock {
    /// The system clock (UTC).
    #[default]
    System,
    /// A fixed time in seconds since 1970-01-01 UTC, for reproducible renders.
    Fixed(i64),
}

impl Clock {
    fn now(self) -> i64 {
        match self {
            Clock::Fixed(t) => t,
            Clock::System => match SystemTime::now().duration_since(UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
            },
        }
    }
}

const NAME: &str = "chat_template";

/// Marks an error raised by the template itself through `raise_exception(msg)`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template.
pub struct Template {
    env: Environment<'static>,
    origin: String,
    /// Extra variables (`enable_thinking`, ...), as keyword arguments of `apply_chat_template`.
    vars: Vec<(String, Value)>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template").field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Template {
    /// Compiles `source`. `origin` names where it came from in error messages (for example
    /// "`tokenizer_config.json`").
    pub fn new(source: &str, origin: &str, clock: Clock) -> Result<Template> {
        let mut env = Environment::new();
        // Jinja2 as transformers configures it (`_compile_jinja_template`).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(python_methods);
        env.set_formatter(|out, _state, value| {
            match value.as_str() {
                Some(s) => out.write_str(s),
                None => out.write_str(&pyjson::py_str(value)),
            }
            .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "writing the rendered text failed"))
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
        });
        env.add_function("strftime_now", move |format: String| {
            crate::strftime::strftime(&format, clock.now()).map_err(|problem| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {problem}"))
            })
        });
        let origin = origin.to_string();
        env.add_template_owned(NAME, rewrite_generation_tags(source)).map_err(|e| Error::TemplateSyntax {
            origin: origin.clone(),
            line: e.line(),
            message: describe(&e),
        })?;
        Ok(Template { env, origin, vars: Vec::new() })
    }

    /// Sets an extra template variable, as a keyword argument of `apply_chat_template` does
    /// (`enable_thinking=False` for Qwen3). It overrides a special token of the same name.
    pub fn set_var(&mut self, name: &str, value: &serde_json::Value) {
        let value = from_json(value);
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_string(), value)),
        }
    }

    /// Where the template came from, as error messages name it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders a conversation, as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], special: &SpecialTokens, ending: Ending) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let mut ctx: Vec<(&str, Value)> = Vec::new();
        for (name, token) in special.named() {
            if let Some(token) = token.filter(|t| !t.is_empty()) {
                ctx.push((name, Value::from(token)));
            }
        }
        if !special.additional_special_tokens.is_empty() {
            let list: Vec<Value> = special.additional_special_tokens.iter().map(|t| Value::from(t.as_str())).collect();
            ctx.push(("additional_special_tokens", Value::from(list)));
        }
        for (name, value) in &self.vars {
            ctx.push((name.as_str(), value.clone()));
        }
        ctx.push(("messages", Value::from(messages)));
        ctx.push(("tools", Value::from(())));
        ctx.push(("documents", Value::from(())));
        ctx.push(("add_generation_prompt", Value::from(ending == Ending::GenerationPrompt)));
        let template = self.env.get_template(NAME).expect("the template was added in `Template::new`");
        template.render(Value::from_pairs(ctx)).map_err(|e| self.render_error(&e))
    }

    fn render_error(&self, e: &minijinja::Error) -> Error {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(Raised(message)) = s.downcast_ref::<Raised>() {
                return Error::TemplateRaised { origin: self.origin.clone(), message: message.clone() };
            }
            source = s.source();
        }
        Error::Render { origin: self.origin.clone(), line: e.line(), message: describe(e) }
    }
}

/// Python methods on values (`content.strip()`, `message.get('x')`, ...): minijinja-contrib's
/// pycompat, with `str.title` as Python has it (a letter is upper-cased unless it follows a cased
/// letter: `"<|im_end|>".title()` is `"<|Im_End|>"`; pycompat only looks at whitespace).
fn python_methods(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let (Some(s), "title", []) = (value.as_str(), method, args) {
        let mut out = String::with_capacity(s.len());
        let mut previous_cased = false;
        for ch in s.chars() {
            if previous_cased {
                out.extend(ch.to_lowercase());
            } else {
                out.extend(ch.to_uppercase());
            }
            previous_cased = ch.is_lowercase() || ch.is_uppercase();
        }
        return Ok(Value::from(out));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// A JSON value as a template value (objects keep their key order).
fn from_json(value: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match value {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => Value::from(items.iter().map(from_json).collect::<Vec<_>>()),
        J::Object(map) => Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), from_json(v)))),
    }
}

/// A minijinja error without its location suffix (the caller reports the line itself).
fn describe(e: &minijinja::Error) -> String {
    let mut text = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which is `json.dumps` with those arguments (Jinja2's own `tojson` escapes HTML; this does not).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let mut style = JsonStyle::new(indent);
    if let Some(separators) = kwargs.get::<Option<Value>>("separators")?.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = separators.try_iter()?.collect();
        match parts.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                style.item_separator = item.as_str().unwrap_or_default().to_string();
                style.key_separator = key.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings (item, key)",
                ));
            }
        }
    }
    style.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    style.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    Ok(Value::from_safe_string(pyjson::dumps(value, &style)?))
}

/// transformers' Jinja2 environment has a `{% generation %}...{% endgeneration %}` block (for
/// assistant-token masks) that renders its body unchanged. minijinja has no such tag, so it is
/// rewritten to `{% if true %}...{% endif %}`, which keeps the tags' whitespace control.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let inner = &tag[2..];
        let modifier = inner.chars().next().filter(|c| *c == '-' || *c == '+');
        let after_mod = &inner[modifier.map_or(0, char::len_utf8)..];
        let trimmed = after_mod.trim_start();
        let word_len = trimmed.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(trimmed.len());
        let replacement = match &trimmed[..word_len] {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(rep) => {
                out.push_str("{%");
                if let Some(m) = modifier {
                    out.push(m);
                }
                out.push_str(&after_mod[..after_mod.len() - trimmed.len()]);
                out.push_str(rep);
                rest = &trimmed[word_len..];
            }
            None => {
                out.push_str("{%");
                rest = inner;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}{% if x %}{%+endgeneration%}"),
            "a{%- if true -%}b{% endif %}{% if x %}{%+endif%}"
        );
        assert_eq!(rewrite_generation_tags("{% generations %}{%"), "{% generations %}{%");
    }
}
