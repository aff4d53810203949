//! `abliterate find` end to end on a tiny fixture model: the outputs and their formats, `edit` taking the
//! direction it writes (and a candidate of its candidates file), `--json`, and bad input with its exact
//! message. A random fixture does not refuse, so the runs that must succeed keep every prompt
//! (`--no-filter`) and accept negative induce scores; the real-model proof is `crates/find/tests/`.

mod util;

use std::path::Path;

use serde_json::Value;
use util::{abliterate, fixture};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const MODEL: &str = "models/llama/bf16";

fn lenient<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "find",
        model,
        "-o",
        out,
        "--no-filter",
        "--refusal-token-id",
        "73",
        "--min-induce",
        "-100",
        "--max-layer-fraction",
        "1",
        "--n-train",
        "16",
        "--n-val",
        "8",
    ]
}

#[test]
fn writes_every_output_and_edit_takes_the_direction() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(MODEL);
    let out = tmp.path().join("found");
    let r = abliterate(lenient(s(&model), s(&out)));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with(&format!("found the refusal direction of `{}` in ", model.display())), "{}", r.stdout);
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(
        files,
        [
            "bypass.svg",
            "candidates.safetensors",
            "direction.safetensors",
            "induce.svg",
            "kl.svg",
            "means.safetensors",
            "report.md",
            "scores.json"
        ]
    );
    let scores: Value = serde_json::from_slice(&std::fs::read(out.join("scores.json")).unwrap()).unwrap();
    let (position, layer) =
        (scores["choice"]["position"].as_i64().unwrap(), scores["choice"]["layer"].as_u64().unwrap());
    let d = direction::Direction::load(&out.join("direction.safetensors"), 64).unwrap();
    assert_eq!(d.meta("layer"), Some(layer.to_string().as_str()));
    assert_eq!(d.meta("position"), Some(position.to_string().as_str()));
    assert_eq!(d.meta("refusal_tokens"), Some("[73]"));
    for key in [
        "token",
        "bypass_score",
        "induce_score",
        "kl_score",
        "model_sha256",
        "prompts_sha256",
        "seed",
        "abliterate_version",
    ] {
        assert!(d.meta(key).is_some_and(|v| !v.is_empty()), "metadata `{key}`");
    }
    let cands = direction::Candidates::load(&out.join("candidates.safetensors"), 64).unwrap();
    assert_eq!(cands.layers(), 2);
    let chosen = cands.get(direction::Candidate { position, layer: layer as usize }).unwrap();
    assert_eq!(chosen, d.values.as_slice());
    assert_eq!(scores["candidates"].as_array().unwrap().len(), cands.positions().len() * 2);
    assert_eq!(scores["counts"]["harmful_train"]["kept"], 16);
    // The harmless means, in the candidates' layout: what the projected variant removes. `direction
    // orthogonalize --means` takes them as they are, at the direction's own place.
    let means = direction::Candidates::load_means(&out.join("means.safetensors"), 64).unwrap();
    assert_eq!((means.positions(), means.layers()), (cands.positions(), 2));
    let mu = means.get(direction::Candidate { position, layer: layer as usize }).unwrap().to_vec();
    assert!(direction::norm(&mu) > 0.0);
    let projected = tmp.path().join("projected.safetensors");
    let r = abliterate([
        "direction",
        "orthogonalize",
        s(&out.join("direction.safetensors")),
        "--means",
        s(&out.join("means.safetensors")),
        "-o",
        s(&projected),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p = direction::Direction::load(&projected, 64).unwrap();
    let dot: f64 = p.values.iter().zip(&mu).map(|(a, b)| a * b).sum();
    // The file stores f32: orthogonal up to its rounding.
    assert!(dot.abs() <= 1e-6 * p.norm() * direction::norm(&mu), "{dot}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.starts_with(&format!("# Refusal direction of `{}`", model.display())), "{report}");
    assert!(std::fs::read_to_string(out.join("kl.svg")).unwrap().starts_with("<svg "));

    // edit takes the direction as it is, and a candidate of the candidates file.
    let edited = tmp.path().join("edited");
    let r = abliterate(["edit", s(&model), "--direction", s(&out.join("direction.safetensors")), "-o", s(&edited)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pick = format!("{position},{layer}");
    let r = abliterate([
        "edit",
        s(&model),
        "--direction",
        s(&out.join("candidates.safetensors")),
        "--candidate",
        &pick,
        "-o",
        s(&tmp.path().join("edited2")),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // An existing output is refused unless --force.
    let r = abliterate(lenient(s(&model), s(&out)));
    assert_eq!(
        (r.code, r.stderr),
        (
            2,
            format!(
                "error: output `{}` already exists; choose another -o, or pass --force to replace it once find has \
                 succeeded\n",
                out.display()
            )
        )
    );
}

#[test]
fn json_summary_and_the_same_result_at_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(MODEL);
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        let mut args = lenient(s(&model), s(&out)).into_iter().map(str::to_string).collect::<Vec<_>>();
        args.extend(["--json".to_string(), "--threads".to_string(), threads.to_string()]);
        let r = abliterate(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["refusal_tokens"], serde_json::json!([73]));
        assert_eq!(v["refusal_tokens_detected"], false);
        outs.push((
            std::fs::read(out.join("direction.safetensors")).unwrap(),
            std::fs::read(out.join("candidates.safetensors")).unwrap(),
        ));
    }
    assert!(outs[0] == outs[1], "outputs differ between 1 and 2 threads");
}

#[test]
fn bad_input_is_refused_with_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture(MODEL);
    let out = tmp.path().join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["find", s(&model), "-o", s(&out)];
        args.extend_from_slice(extra);
        let r = abliterate(&args);
        assert!(!out.exists(), "no output after a failure");
        (r.code, r.stderr)
    };
    // A random model does not refuse: the filter keeps (almost) no harmful prompt.
    let (code, err) = run(&["--refusal-token-id", "73"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: the model barely refuses: only "), "{err}");
    assert!(err.contains("sampled harmful training prompts get a positive refusal score (refusal token"), "{err}");

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "[\"ok\",\n {\"question\": \"x\"}]").unwrap();
    assert_eq!(
        run(&["--harmful", s(&bad)]),
        (
            2,
            format!(
                "error: prompt file `{}` line 2: element 1 is an object without any of the fields `instruction`, \
                 `prompt`, `goal`, `text`\n",
                bad.display()
            )
        )
    );
    let small = tmp.path().join("small.txt");
    std::fs::write(&small, "one\ntwo\n").unwrap();
    assert_eq!(
        run(&["--harmful", s(&small), "--paper-sampling"]),
        (
            2,
            format!(
                "error: harmful_train (`{}`): cannot sample 128 of 2: the sample is larger than the population; \
                 --paper-sampling draws exactly 128 prompts, so the set needs at least that many\n",
                small.display()
            )
        )
    );
    let (code, err) = run(&["--refusal-token", "hello world"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: --refusal-token \"hello world\" encodes to "), "{err}");
    let (code, err) = run(&["--positions", "-99", "--refusal-token-id", "73"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: --positions -99: the template has "), "{err}");
    let inside = model.join("found");
    let r = abliterate(["find", s(&model), "-o", s(&inside)]);
    assert_eq!(
        (r.code, r.stderr),
        (
            2,
            format!(
                "error: output `{}` is the model directory or inside it; the model is only read, so choose another -o\n",
                inside.display()
            )
        )
    );
}
