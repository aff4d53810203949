//! Prompt lists: the readers for user files and the default sets compiled into the binary.
//!
//! A prompt file is a JSON array (of strings, or of objects), JSON Lines (one string or object per
//! line), CSV with a header row, or plain text with one prompt per line (blank lines skipped). An
//! object or CSV row gives its instruction in the first of the fields `instruction`, `prompt`, `goal`,
//! `text` that it has (matched ignoring case), and its category, where present, in `category`. The
//! format comes from the extension (`.json`, `.jsonl`/`.ndjson`, `.csv`; anything else is sniffed: `[`
//! starts JSON, `{` JSON Lines, otherwise plain text). Anything else is an error naming the file and the
//! line. Instructions are kept verbatim (no trimming inside JSON or CSV; plain-text lines lose only
//! their line ending and trailing whitespace).
//!
//! This module never writes a file and never opens one for writing.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{EvalError, Result};

/// One prompt: the user's instruction and, where the source has one, its category.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Prompt {
    pub instruction: String,
    pub category: Option<String>,
}

impl Prompt {
    pub fn new(instruction: &str) -> Prompt {
        Prompt { instruction: instruction.to_string(), category: None }
    }
}

/// A list of prompts and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptSet {
    pub prompts: Vec<Prompt>,
    /// The file's path, or `embedded:<split>` for a default set.
    pub source: String,
    /// sha256 of the source's bytes (the file, or the embedded JSON), lowercase hex.
    pub sha256: String,
}

impl PromptSet {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn instructions(&self) -> Vec<&str> {
        self.prompts.iter().map(|p| p.instruction.as_str()).collect()
    }
}

/// The fields an instruction may be read from, in order of preference.
pub const INSTRUCTION_FIELDS: [&str; 4] = ["instruction", "prompt", "goal", "text"];

/// A prompt file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    JsonLines,
    Csv,
    Text,
}

impl Format {
    /// The format a file's extension says, or what its first character suggests.
    pub fn detect(path: &Path, text: &str) -> Format {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("json") => Format::Json,
            Some("jsonl" | "ndjson") => Format::JsonLines,
            Some("csv") => Format::Csv,
            _ => match text.trim_start().chars().next() {
                Some('[') => Format::Json,
                Some('{') => Format::JsonLines,
                _ => Format::Text,
            },
        }
    }
}

/// Reads a prompt file (format from [`Format::detect`]).
pub fn read(path: &Path) -> Result<PromptSet> {
    let bytes = std::fs::read(path).map_err(|cause| EvalError::Io { path: path.to_path_buf(), cause })?;
    let origin = path.display().to_string();
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| bad(&origin, line_of(&bytes, e.valid_up_to()), "is not UTF-8 text".to_string()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let prompts = parse(text, Format::detect(path, text), &origin)?;
    Ok(PromptSet { prompts, source: origin, sha256: sha256_hex(&bytes) })
}

/// Parses prompt text of a known format; `origin` names it in errors.
pub fn parse(text: &str, format: Format, origin: &str) -> Result<Vec<Prompt>> {
    let prompts = match format {
        Format::Json => parse_json(text, origin)?,
        Format::JsonLines => parse_jsonl(text, origin)?,
        Format::Csv => parse_csv(text, origin)?,
        Format::Text => text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .map(|l| Prompt { instruction: l.to_string(), category: None })
            .collect(),
    };
    if prompts.is_empty() {
        return Err(bad(origin, None, "has no prompts".to_string()));
    }
    Ok(prompts)
}

fn bad(origin: &str, line: Option<usize>, problem: String) -> EvalError {
    EvalError::Prompts { origin: origin.to_string(), line, problem }
}

fn line_of(bytes: &[u8], offset: usize) -> Option<usize> {
    Some(bytes[..offset.min(bytes.len())].iter().filter(|&&b| b == b'\n').count() + 1)
}

/// The prompt in one JSON value (a string, or an object with an instruction field).
fn from_value(v: &Value, what: &str) -> std::result::Result<Prompt, String> {
    let fields = INSTRUCTION_FIELDS.map(|f| format!("`{f}`")).join(", ");
    match v {
        Value::String(s) => Ok(Prompt { instruction: checked(s)?, category: None }),
        Value::Object(map) => {
            let get = |name: &str| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
            let (field, value) = INSTRUCTION_FIELDS
                .iter()
                .find_map(|f| get(f).map(|v| (*f, v)))
                .ok_or_else(|| format!("{what} is an object without any of the fields {fields}"))?;
            let instruction = match value {
                Value::String(s) => checked(s)?,
                other => return Err(format!("{what}: field `{field}` is {}, not a string", kind(other))),
            };
            let category = match get("category") {
                None | Some(Value::Null) => None,
                Some(Value::String(c)) => Some(c.clone()),
                Some(other) => return Err(format!("{what}: field `category` is {}, not a string", kind(other))),
            };
            Ok(Prompt { instruction, category })
        }
        other => {
            Err(format!("{what} is {}; expected a string or an object with one of the fields {fields}", kind(other)))
        }
    }
}

fn checked(s: &str) -> std::result::Result<String, String> {
    if s.trim().is_empty() { Err("the instruction is empty".to_string()) } else { Ok(s.to_string()) }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_json(text: &str, origin: &str) -> Result<Vec<Prompt>> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| bad(origin, Some(e.line()), format!("not valid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(bad(origin, Some(1), format!("is {}; a JSON prompt file is an array", kind(&value))));
    };
    let lines = element_lines(text);
    items
        .iter()
        .enumerate()
        .map(|(i, v)| from_value(v, &format!("element {i}")).map_err(|p| bad(origin, lines.get(i).copied(), p)))
        .collect()
}

/// The line on which each element of a top-level JSON array starts (the text is valid JSON).
fn element_lines(text: &str) -> Vec<usize> {
    let (mut depth, mut in_string, mut escaped, mut line) = (0usize, false, false, 1usize);
    let mut expect_value = false;
    let mut out = Vec::new();
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_whitespace() {
            continue;
        }
        if depth == 1 && expect_value && c != ']' {
            out.push(line);
            expect_value = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect_value = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_value = true,
            _ => {}
        }
    }
    out
}

fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| bad(origin, Some(i + 1), format!("not valid JSON: {e}")))?;
        out.push(from_value(&v, "the line").map_err(|p| bad(origin, Some(i + 1), p))?);
    }
    Ok(out)
}

fn parse_csv(text: &str, origin: &str) -> Result<Vec<Prompt>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let csv_error = |e: csv::Error| {
        let line = e.position().map(|p| p.line() as usize);
        bad(origin, line, format!("not valid CSV: {e}"))
    };
    let headers = reader.headers().map_err(csv_error)?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let fields = INSTRUCTION_FIELDS.map(|f| format!("`{f}`")).join(", ");
    let (field, col) = INSTRUCTION_FIELDS.iter().find_map(|f| column(f).map(|c| (*f, c))).ok_or_else(|| {
        bad(
            origin,
            Some(1),
            format!("the header row has none of the columns {fields} (found {:?})", headers.iter().collect::<Vec<_>>()),
        )
    })?;
    let category = column("category");
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map(|p| p.line() as usize);
        let instruction = record.get(col).unwrap_or("");
        let instruction = checked(instruction).map_err(|p| bad(origin, line, format!("column `{field}`: {p}")))?;
        let category = category.and_then(|c| record.get(c)).filter(|c| !c.is_empty()).map(str::to_string);
        out.push(Prompt { instruction, category });
    }
    Ok(out)
}

/// Lowercase hex sha256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The default prompt sets compiled into the binary (written for this project; `prompts/*.json` in this
/// crate): training and validation sets for `find`, evaluation sets for `verify`. No prompt is in two
/// sets; every harmful prompt has a category.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    HarmfulTrain,
    HarmlessTrain,
    HarmfulVal,
    HarmlessVal,
    HarmfulEval,
    HarmlessEval,
}

impl Split {
    pub const ALL: [Split; 6] = [
        Split::HarmfulTrain,
        Split::HarmlessTrain,
        Split::HarmfulVal,
        Split::HarmlessVal,
        Split::HarmfulEval,
        Split::HarmlessEval,
    ];

    /// `harmful_train`, ... (the file name without `.json`).
    pub fn name(self) -> &'static str {
        match self {
            Split::HarmfulTrain => "harmful_train",
            Split::HarmlessTrain => "harmless_train",
            Split::HarmfulVal => "harmful_val",
            Split::HarmlessVal => "harmless_val",
            Split::HarmfulEval => "harmful_eval",
            Split::HarmlessEval => "harmless_eval",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Split::HarmfulTrain => include_str!("../prompts/harmful_train.json"),
            Split::HarmlessTrain => include_str!("../prompts/harmless_train.json"),
            Split::HarmfulVal => include_str!("../prompts/harmful_val.json"),
            Split::HarmlessVal => include_str!("../prompts/harmless_val.json"),
            Split::HarmfulEval => include_str!("../prompts/harmful_eval.json"),
            Split::HarmlessEval => include_str!("../prompts/harmless_eval.json"),
        }
    }
}

/// A default prompt set.
pub fn embedded(split: Split) -> PromptSet {
    let text = split.json();
    let source = format!("embedded:{}", split.name());
    let prompts = parse(text, Format::Json, &source).expect("the embedded prompt sets are valid (tested)");
    PromptSet { prompts, source, sha256: sha256_hex(text.as_bytes()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, format: Format) -> String {
        parse(text, format, "p.json").unwrap_err().to_string()
    }

    #[test]
    fn reads_every_format_and_field() {
        let json = r#"["Say hi", {"instruction": "Write a poem", "category": "art"}, {"Goal": "Plan a trip"}, {"text": "t", "category": null}]"#;
        let p = parse(json, Format::Json, "x").unwrap();
        assert_eq!(
            p.iter().map(|p| p.instruction.as_str()).collect::<Vec<_>>(),
            ["Say hi", "Write a poem", "Plan a trip", "t"]
        );
        assert_eq!(p[1].category.as_deref(), Some("art"));
        assert_eq!(p[3].category, None);
        // `instruction` wins over `prompt` when both are there.
        let p = parse(r#"{"prompt": "b", "instruction": "a"}"#, Format::JsonLines, "x").unwrap();
        assert_eq!(p[0].instruction, "a");
        let p = parse("\n\"one\"\n{\"goal\": \"two\"}\n", Format::JsonLines, "x").unwrap();
        assert_eq!(p.len(), 2);
        let p = parse("Goal,Category\n\"Hello, world\",greeting\nBye,\n", Format::Csv, "x").unwrap();
        assert_eq!(
            p,
            vec![
                Prompt { instruction: "Hello, world".into(), category: Some("greeting".into()) },
                Prompt { instruction: "Bye".into(), category: None }
            ]
        );
        let p = parse("first  \r\n\n  second\n", Format::Text, "x").unwrap();
        assert_eq!(p.iter().map(|p| p.instruction.as_str()).collect::<Vec<_>>(), ["first", "  second"]);
    }

    #[test]
    fn errors_name_the_file_and_the_line() {
        assert_eq!(
            err("[\n  \"a\",\n  {\"name\": \"b\"}\n]", Format::Json),
            "prompt file `p.json` line 3: element 1 is an object without any of the fields `instruction`, `prompt`, `goal`, `text`"
        );
        assert_eq!(
            err("[\"a\",\n 3]", Format::Json),
            "prompt file `p.json` line 2: element 1 is a number; expected a string or an object with one of the fields `instruction`, `prompt`, `goal`, `text`"
        );
        assert_eq!(
            err("{\"a\": 1}", Format::Json),
            "prompt file `p.json` line 1: is an object; a JSON prompt file is an array"
        );
        assert!(err("[\"a\",\n", Format::Json).starts_with("prompt file `p.json` line 2: not valid JSON: "));
        assert_eq!(
            err("\"ok\"\n{\"instruction\": 5}", Format::JsonLines),
            "prompt file `p.json` line 2: the line: field `instruction` is a number, not a string"
        );
        assert_eq!(err("[\"  \"]", Format::Json), "prompt file `p.json` line 1: the instruction is empty");
        assert_eq!(
            err("question,answer\na,b\n", Format::Csv),
            "prompt file `p.json` line 1: the header row has none of the columns `instruction`, `prompt`, `goal`, `text` (found [\"question\", \"answer\"])"
        );
        assert_eq!(
            err("prompt\nok\n\"\"\n", Format::Csv),
            "prompt file `p.json` line 3: column `prompt`: the instruction is empty"
        );
        assert_eq!(err("[]", Format::Json), "prompt file `p.json`: has no prompts");
        assert_eq!(err("\n \n", Format::Text), "prompt file `p.json`: has no prompts");
    }

    #[test]
    fn reads_files_and_detects_formats() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let set = read(&w("a.txt", b"\xef\xbb\xbfone\ntwo\n")).unwrap();
        assert_eq!(set.instructions(), ["one", "two"]);
        assert_eq!(set.sha256, sha256_hex(b"\xef\xbb\xbfone\ntwo\n"));
        assert_eq!(read(&w("b", b"  [\"x\"]")).unwrap().instructions(), ["x"]);
        assert_eq!(read(&w("c.data", b"{\"goal\": \"y\"}\n")).unwrap().instructions(), ["y"]);
        let bad = w("d.txt", b"ok\n\xff\n");
        assert_eq!(
            read(&bad).unwrap_err().to_string(),
            format!("prompt file `{}` line 2: is not UTF-8 text", bad.display())
        );
        let missing = dir.path().join("none.json");
        assert!(read(&missing).unwrap_err().to_string().starts_with(&format!("`{}`: ", missing.display())));
    }

    #[test]
    fn embedded_sets_are_valid_disjoint_and_categorised() {
        let mut seen = std::collections::HashMap::new();
        // Issue 11: at least 160 + 160 training, 40 + 40 validation and 100 + 100 evaluation prompts.
        let sizes = [160, 160, 40, 40, 100, 100];
        for (split, size) in Split::ALL.into_iter().zip(sizes) {
            let set = embedded(split);
            assert!(set.len() >= size, "{} has {} prompts", split.name(), set.len());
            assert_eq!(set.source, format!("embedded:{}", split.name()));
            for p in &set.prompts {
                if let Some(other) = seen.insert(p.instruction.trim().to_lowercase(), split) {
                    panic!("{:?} is in both {} and {}", p.instruction, other.name(), split.name());
                }
                if split.name().starts_with("harmful") {
                    assert!(p.category.is_some(), "harmful prompt without a category: {:?}", p.instruction);
                }
            }
        }
    }
}
