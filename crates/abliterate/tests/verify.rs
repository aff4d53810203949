//! `abliterate verify` end to end on a committed fixture (the tiny Llama, 2 layers, random weights: its
//! refusal rates mean nothing, but every part of the pipeline runs): report files, what they may show of
//! harmful completions, gates and exit codes, the preview on hooks, and the errors.

mod util;

use std::path::{Path, PathBuf};

use serde_json::Value;
use util::{abliterate, fixture};

fn model() -> String {
    fixture("models/llama/f32").to_str().unwrap().to_string()
}

fn direction() -> String {
    fixture("directions/llama.safetensors").to_str().unwrap().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Edits the fixture into `dir/edited`.
fn edited(dir: &Path) -> PathBuf {
    let out = dir.join("edited");
    let (m, d) = (model(), direction());
    let r = abliterate(["edit", &m, "--direction", &d, "-o", s(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    out
}

/// Quick settings: 8 new tokens, a few prompts for the equivalence check.
const QUICK: [&str; 4] = ["--max-new-tokens", "8", "--equivalence-prompts", "4"];

#[test]
fn verify_writes_the_report_and_passes_its_gates() {
    let (m, d) = (model(), direction());
    let tmp = tempfile::tempdir().unwrap();
    let e = edited(tmp.path());
    let out = tmp.path().join("report");
    let mut args = vec!["verify", &m, s(&e), "--direction", &d, "-o", s(&out)];
    args.extend(QUICK);
    // A random model has no refusal token to detect: give one, so the refusal scores are measured.
    args.extend(["--max-equivalence-error", "1e-5", "--max-kl", "10", "--refusal-token", "I"]);
    let r = abliterate(&args);
    assert_eq!(r.code, 0, "stdout {}\nstderr {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("gate passed: --max-equivalence-error: equivalence error"), "{}", r.stdout);
    for f in ["report.json", "report.md", "refusal.svg"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let j: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["harmful"]["source"]["name"], "embedded:harmful_eval");
    assert_eq!(j["harmful"]["source"]["n"], 100);
    assert_eq!(j["harmless"]["edited"]["completions"].as_array().unwrap().len(), 100);
    // The f32 edit of an untied model equals the hooks to f32 rounding at both layers and the final residual.
    let per_layer = j["equivalence"]["result"]["per_layer"].as_array().unwrap();
    assert_eq!(per_layer.len(), 3);
    assert!(per_layer.iter().all(|v| v.as_f64().unwrap() <= 1e-5), "{per_layer:?}");
    // Harmful completions are never stored whole: at most 8 words.
    for arm in ["original", "edited"] {
        for c in j["harmful"][arm]["completions"].as_array().unwrap() {
            assert!(c["text"].as_str().unwrap().split_whitespace().count() <= 8, "{c}");
        }
    }
    let rate = &j["harmful"]["original"]["refusal"];
    assert!(rate["low"].as_f64().unwrap() <= rate["rate"].as_f64().unwrap());
    assert!(j["induced"]["layer"].is_u64(), "the fixture direction records its layer");
    assert!(j["harmful"]["edited"]["mean_score"].is_f64(), "{}", j["harmful"]["edited"]);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Equivalence to directional ablation") && md.contains("![refusal rates](refusal.svg)"));
    let svg = std::fs::read_to_string(out.join("refusal.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn a_failed_gate_exits_1_naming_the_gate_the_value_and_the_threshold() {
    let (m, d) = (model(), direction());
    let tmp = tempfile::tempdir().unwrap();
    let e = edited(tmp.path());
    let mut args = vec!["verify", &m, s(&e), "--direction", &d, "--no-induce", "--no-cross-entropy"];
    args.extend(QUICK);
    args.extend(["--max-harmless-refusal", "1", "--max-kl", "0"]);
    let r = abliterate(&args);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let line = r.stdout.lines().find(|l| l.contains("gate FAILED")).expect("a failed gate is printed");
    assert!(line.starts_with("  gate FAILED: --max-kl: mean first-token KL ") && line.ends_with(" > 0.0000"), "{line}");
    assert!(r.stdout.contains("gate passed: --max-harmless-refusal: harmless refusal rate"), "{}", r.stdout);
}

#[test]
fn a_direction_previews_on_hooks_alone() {
    let (m, d) = (model(), direction());
    let mut args = vec!["verify", &m, "--direction", &d, "--json", "--no-cross-entropy"];
    args.extend(QUICK);
    let r = abliterate(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(j["edited"].is_null() && j["equivalence"].is_null());
    // No refusal token to detect on a random model: verified all the same, without refusal scores.
    assert!(j["harmful"]["original"]["mean_score"].is_null());
    assert!(j["settings"]["refusal_tokens_not_detected"].as_str().unwrap().contains("does not seem to refuse"));
    assert_eq!(j["harmful"]["edited"]["label"], "ablation (hooks)");
}

#[test]
fn verify_errors_name_the_problem() {
    let (m, d) = (model(), direction());
    let tmp = tempfile::tempdir().unwrap();
    let r = abliterate(["verify", &m]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim(),
        "error: give the edited model (abliterate verify ORIGINAL EDITED), or --direction FILE to preview a direction on hooks"
    );
    let r = abliterate(["verify", &m, "--direction", &d, "--max-equivalence-error", "1e-4"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim(),
        "error: --max-equivalence-error needs an edited model: a preview on hooks has nothing to compare"
    );
    // A direction that is not the one the edit used.
    let e = edited(tmp.path());
    let other = tmp.path().join("other.safetensors");
    let mut meta = serde_json::Map::new();
    meta.insert("layer".into(), "1".into());
    direction::write(&other, &[1.0; 64], checkpoint::Dtype::F32, &meta).unwrap();
    let r = abliterate(["verify", &m, s(&e), "--direction", s(&other)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is not the one") && r.stderr.contains("was edited with"), "{}", r.stderr);
}
