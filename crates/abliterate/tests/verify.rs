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

/// An edit that one direction and one scale cannot state (per-layer directions, a layer kernel, norm
/// preservation) is compared with its own hooks, rebuilt from its manifest's options and the direction file:
/// on the f32 fixture they agree to f32 rounding, except the norm-preserving edit, which says why not.
#[test]
fn a_variant_edit_is_compared_with_its_own_hooks_rebuilt_from_its_manifest() {
    let m = model();
    let tmp = tempfile::tempdir().unwrap();
    let per_layer = tmp.path().join("per_layer.safetensors");
    let rows: Vec<f64> = (0..2 * 64).map(|i| ((i * 31 % 23) as f64 / 7.0 - 1.5) + (i as f64 * 0.05).sin()).collect();
    direction::set::write_per_layer(&per_layer, &rows, 2, 1, None, checkpoint::Dtype::F32, &Default::default())
        .unwrap();
    let table = tmp.path().join("kernel.json");
    std::fs::write(&table, r#"{"attn": [1.2, 0.7], "mlp": [0.8, 0.0], "embedding": 0.5}"#).unwrap();
    for norm_preserving in [false, true] {
        let e = tmp.path().join(format!("edited-{norm_preserving}"));
        let mut args = vec!["edit", &m, "--direction", s(&per_layer), "--kernel-table", s(&table), "-o", s(&e)];
        if norm_preserving {
            args.push("--norm-preserving");
        }
        let r = abliterate(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let mut args = vec!["verify", &m, s(&e), "--direction", s(&per_layer), "--json", "--no-cross-entropy"];
        args.extend(QUICK);
        let r = abliterate(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let j: Value = serde_json::from_str(&r.stdout).unwrap();
        let eq = &j["equivalence"];
        assert!(eq["hooks"].as_str().unwrap().starts_with("the edit's own writes, rebuilt from its recorded options"));
        let max = eq["result"]["max"].as_f64().unwrap();
        if norm_preserving {
            assert_eq!(eq["caveats"][0]["kind"], "norm_preserving", "{eq}");
            assert!(max > 1e-4, "{eq}");
        } else {
            assert_eq!(eq["caveats"], serde_json::json!([]), "{eq}");
            assert!(max <= 1e-5, "{eq}");
        }
        assert!(j["induced"].is_null(), "per-layer directions have no single direction to add");
    }
    // A preview on hooks needs one direction.
    let r = abliterate(["verify", &m, "--direction", s(&per_layer)]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "error: direction file `{}` holds per_layer directions: a preview on hooks needs one direction",
            per_layer.display()
        )
    );
}
