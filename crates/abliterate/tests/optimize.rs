//! `abliterate optimize` end to end on the committed tiny refusing model (`fixtures/tiny-refusal/model`,
//! seconds per run): the search, its resumption, the outputs, and the errors for bad options.

mod util;

use std::path::{Path, PathBuf};

use serde_json::Value;
use util::abliterate;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-refusal/model")
}

/// The tiny model's (layers, hidden size), from its `config.json`.
fn tiny_shape() -> (usize, usize) {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap()).unwrap();
    let get = |key: &str| config[key].as_u64().unwrap() as usize;
    (get("num_hidden_layers"), get("hidden_size"))
}

/// heretic's per-layer scope: block `b` takes the candidate of the residual leaving it (entering `b + 1`),
/// the last block the last candidate's.
fn per_layer_sites(layers: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..layers).map(move |block| (block, (block + 1).min(layers - 1)))
}

/// A small search: 8 harmful and 8 harmless prompts, 16 new tokens.
fn optimize(out: &Path, trials: usize, extra: &[&str]) -> util::Run {
    let mut args: Vec<String> = vec![
        "optimize".into(),
        tiny().display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--trials".into(),
        trials.to_string(),
        "--startup".into(),
        "3".into(),
        "--prompts".into(),
        "8".into(),
        "--max-new-tokens".into(),
        "16".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    abliterate(&args)
}

/// The trials of a run without their timings.
fn trials(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("trials.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// The position of `OUT/find`'s direction: the candidates' position the trials use.
fn find_position(out: &Path, hidden: usize) -> i64 {
    direction::Direction::load(&out.join("find/direction.safetensors"), hidden)
        .unwrap()
        .meta("position")
        .unwrap()
        .parse()
        .unwrap()
}

/// verify compared optimize's chosen checkpoint with the edit's own hooks (its directions, its kernel's
/// scales; `verify::equivalence::plan_hooks`): equal up to the bf16 rounding of the edited weights (the tiny
/// `run`'s 5.8e-3 with one direction), except a norm-preserving edit, which says why not.
fn assert_own_hooks(v: &Value) {
    let eq = &v["report"]["equivalence"];
    let hooks = eq["hooks"].as_str().unwrap();
    assert!(hooks.starts_with("the edit's own writes (`edit::Plan::write_ops`)"), "{eq}");
    let per_layer = v["chosen"]["params"]["direction_scope"] == "per_layer";
    assert_eq!(hooks.contains("against its own block's direction"), per_layer, "{eq}");
    let kinds: Vec<&str> = eq["caveats"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap()).collect();
    let max = eq["result"]["max"].as_f64().unwrap();
    if v["chosen"]["params"]["norm_preserving"] == true {
        // Its columns were rescaled, which no hook does: stated, and a difference well above the rounding.
        assert_eq!(kinds, ["norm_preserving", "rounding"], "{eq}");
        assert!(max > 2e-2 && max < 0.5, "{eq}");
    } else {
        assert_eq!(kinds, ["rounding"], "{eq}");
        assert!(max < 2e-2, "{eq}");
    }
}

#[test]
fn optimize_searches_chooses_edits_and_verifies_and_a_resumed_search_equals_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Uninterrupted: 6 trials.
    let r = optimize(&a, 6, &["--max-kl", "10"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        (v["trials"].as_u64(), v["new_trials"].as_u64(), v["resumed"].as_bool()),
        (Some(6), Some(6), Some(false))
    );
    assert_own_hooks(&v);

    // Interrupted after 3 trials (a run of 3), then the same command with 6: it runs only the missing 3.
    let r = optimize(&b, 3, &["--max-kl", "10"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = optimize(&b, 6, &["--max-kl", "10"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let w: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((w["new_trials"].as_u64(), w["resumed"].as_bool()), (Some(3), Some(true)));
    let (ta, tb) = (trials(&a), trials(&b));
    assert_eq!(ta.len(), 6);
    assert_eq!(ta, tb, "a resumed search must propose and measure the same trials");
    assert_eq!((&v["chosen"]["trial"], &v["chosen"]["params"]), (&w["chosen"]["trial"], &w["chosen"]["params"]));

    // The choice is the rule's over the stored trials, and is on the front.
    let scored: Vec<(u64, f64)> =
        ta.iter().map(|t| (t["refusals"].as_u64().unwrap(), t["kl"].as_f64().unwrap())).collect();
    let best = scored
        .iter()
        .enumerate()
        .filter(|(_, s)| s.1 <= 10.0)
        .min_by(|x, y| x.1.0.cmp(&y.1.0).then(x.1.1.total_cmp(&y.1.1)))
        .unwrap()
        .0;
    assert_eq!(v["chosen"]["trial"].as_u64(), Some(best as u64));
    let front: Vec<u64> = v["front"].as_array().unwrap().iter().map(|t| t["trial"].as_u64().unwrap()).collect();
    assert!(front.contains(&(best as u64)), "{front:?}");
    for t in &ta {
        let (r, k) = (t["refusals"].as_u64().unwrap(), t["kl"].as_f64().unwrap());
        let dominated = scored.iter().any(|&(r2, k2)| r2 <= r && k2 <= k && (r2 < r || k2 < k));
        assert_eq!(front.contains(&t["trial"].as_u64().unwrap()), !dominated, "{t}");
        assert!(k >= 0.0 && r <= 8 && t["refusals_second_judge"].as_u64().unwrap() >= r);
    }

    // Outputs: the report, the plot, the chosen files that `edit` reads, the model with its card, verify's report.
    let report = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert!(report.contains(&format!("## Pareto front ({} of 6 trials)", front.len())), "{report}");
    assert!(report.contains(&format!("Chosen: **trial {best}**")), "{report}");
    let svg = std::fs::read_to_string(a.join("pareto.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), 6 + 1);
    let kernel: Value = serde_json::from_str(&std::fs::read_to_string(a.join("chosen/kernel.json")).unwrap()).unwrap();
    assert_eq!(kernel["attn"].as_array().unwrap().len(), tiny_shape().0);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("model/abliterate.json")).unwrap()).unwrap();
    assert_eq!(manifest["options"]["norm_preserving"], v["chosen"]["params"]["norm_preserving"]);
    let card = std::fs::read_to_string(a.join("model/README.md")).unwrap();
    for needle in [
        "made by `abliterate`",
        "with `abliterate optimize`",
        "attention-output kernel",
        "MLP-down kernel",
        "norm-preserving |",
        &format!("**trial {best}**"),
    ] {
        assert!(card.contains(needle), "model card lacks {needle:?}:\n{card}");
    }
    let vr: Value = serde_json::from_str(&std::fs::read_to_string(a.join("verify/report.json")).unwrap()).unwrap();
    assert!(
        vr["harmful"]["edited"]["refusal_second"]["rate"].as_f64().unwrap()
            >= vr["harmful"]["edited"]["refusal"]["rate"].as_f64().unwrap()
    );
    assert!(std::fs::read_to_string(a.join("verify/report.md")).unwrap().contains("second judge"));
    assert_eq!(v["report"]["harmful"]["edited"]["refusal"], vr["harmful"]["edited"]["refusal"]);

    // Rerunning with a KL bound no trial meets fails with a message and keeps the trials; other settings are refused.
    let r = optimize(&a, 6, &["--max-kl", "0"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.starts_with("error: no trial has first-token KL <= --max-kl 0 (the smallest is "), "{}", r.stderr);
    assert_eq!(trials(&a), ta);
    let r = optimize(&a, 6, &["--seed", "1"]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr.trim_end(),
        format!(
            "error: `{}`: the trials in this OUT were made with other settings (`/sampler/seed`: 0 there, 1 now); run \
             with the same settings to resume, or choose another -o",
            a.join("settings.json").display()
        )
    );
}

#[test]
fn bad_options_are_refused_with_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let tiny_str = tiny().display().to_string();
    let e = |extra: &[&str]| {
        let o = out.display().to_string();
        let mut args = vec!["optimize", tiny_str.as_str(), "-o", o.as_str()];
        args.extend(extra);
        let r = abliterate(&args);
        assert_eq!(r.code, 2, "{}", r.stderr);
        r.stderr.trim_end().to_string()
    };
    assert_eq!(e(&["--trials", "0"]), "error: --trials must be at least 1");
    assert_eq!(e(&["--prompts", "0"]), "error: --prompts must be at least 1");
    assert_eq!(e(&["--max-kl", "-1"]), "error: --max-kl -1 must be a finite number >= 0");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("something"), "").unwrap();
    assert_eq!(
        e(&[]),
        format!(
            "error: `{}`: exists and holds no `settings.json` of an optimize run; choose another -o",
            out.display()
        )
    );
    assert!(!out.join("find").exists());
}

/// heretic's per-layer scope (seed 2's uniform trials choose one on the tiny model): the chosen file is a
/// per-layer file whose block `l` is find's candidate of the residual `l + 1` (the last block the last
/// candidate), and the edit it states by hand (`abliterate edit --direction --kernel-table`) is the model it
/// wrote, byte for byte.
#[test]
fn a_chosen_per_layer_trial_is_written_as_a_per_layer_file_and_reproduced_by_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = out.display().to_string();
    let r = abliterate([
        "optimize",
        tiny().to_str().unwrap(),
        "-o",
        &o,
        "--trials",
        "6",
        "--startup",
        "6",
        "--prompts",
        "8",
        "--max-new-tokens",
        "16",
        "--seed",
        "2",
        "--max-kl",
        "10",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["chosen"]["params"]["direction_scope"], "per_layer", "{}", v["chosen"]);
    let scopes: Vec<Value> = trials(&out).iter().map(|t| t["params"]["direction_scope"].clone()).collect();
    assert!(scopes.contains(&Value::from("global")), "{scopes:?}");

    let (layers, hidden) = tiny_shape();
    let chosen = direction::Directions::open(&out.join("chosen/direction.safetensors"), hidden, layers, None).unwrap();
    assert_eq!(chosen.layout, direction::Layout::PerLayer);
    let c = direction::Candidates::load(&out.join("find/candidates.safetensors"), hidden).unwrap();
    let position = find_position(&out, hidden);
    for (block, residual) in per_layer_sites(layers) {
        let unit = c.direction(direction::Candidate { position, layer: residual }).unwrap().unit();
        let got = chosen.for_layer(Some(block)).as_slice();
        assert!(got.iter().zip(&unit).all(|(a, b)| (a - b).abs() < 1e-12), "block {block}");
    }
    let card = std::fs::read_to_string(out.join("model/README.md")).unwrap();
    assert!(card.contains("heretic's per-layer scope"), "{card}");
    assert_own_hooks(&v);

    let by_hand = tmp.path().join("by-hand");
    let mut args = vec![
        "edit".to_string(),
        tiny().display().to_string(),
        "--direction".into(),
        out.join("chosen/direction.safetensors").display().to_string(),
        "--kernel-table".into(),
        out.join("chosen/kernel.json").display().to_string(),
        "-o".into(),
        by_hand.display().to_string(),
    ];
    if v["chosen"]["params"]["norm_preserving"] == true {
        args.push("--norm-preserving".into());
    }
    let r = abliterate(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(read(&by_hand) == read(&out.join("model")), "the stated edit is not the written model");
}

/// `--projected on`: every trial's candidates lose their component along the harmless mean of their site
/// (find's `means.safetensors`); the chosen file holds the projected direction(s), computed here from the
/// two files by hand, and says so. A find output without means is refused for it, naming the file.
#[test]
fn projected_trials_take_find_candidates_without_their_harmless_mean_component() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let r = optimize(&out, 4, &["--projected", "on", "--seed", "2", "--max-kl", "10"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(trials(&out).iter().all(|t| t["params"]["projected"] == true));
    let settings: Value = serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    assert_eq!(settings["space"]["projected"], "on");

    let (layers, hidden) = tiny_shape();
    let c = direction::Candidates::load(&out.join("find/candidates.safetensors"), hidden).unwrap();
    let m = direction::Candidates::load_means(&out.join("find/means.safetensors"), hidden).unwrap();
    let position = find_position(&out, hidden);
    // r − (r·μ)/(μ·μ) μ, normalized, for the residual entering `layer`.
    let projected_unit = |layer: usize| -> Vec<f64> {
        let at = direction::Candidate { position, layer };
        let (r, mu) = (c.get(at).unwrap(), m.get(at).unwrap());
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let k = dot(r, mu) / dot(mu, mu);
        let p: Vec<f64> = r.iter().zip(mu).map(|(x, y)| x - k * y).collect();
        let n = dot(&p, &p).sqrt();
        assert!(dot(&p, mu).abs() < 1e-9 * n * dot(mu, mu).sqrt());
        p.iter().map(|x| x / n).collect()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-10);
    let chosen = direction::Directions::open(&out.join("chosen/direction.safetensors"), hidden, layers, None).unwrap();
    let params = &v["chosen"]["params"];
    if params["direction_scope"] == "per_layer" {
        for (block, residual) in per_layer_sites(layers) {
            assert!(close(chosen.for_layer(Some(block)).as_slice(), &projected_unit(residual)), "block {block}");
        }
    } else {
        let index = params["direction_index"].as_f64().unwrap();
        let (a, t) = (index.floor() as usize, index.fract());
        let (ra, rb) = (projected_unit(a), projected_unit((a + 1).min(layers - 1)));
        let mix: Vec<f64> = ra.iter().zip(&rb).map(|(x, y)| (1.0 - t) * x + t * y).collect();
        let n = mix.iter().map(|x| x * x).sum::<f64>().sqrt();
        let want: Vec<f64> = mix.iter().map(|x| x / n).collect();
        assert!(close(chosen.single.as_ref().unwrap().values.as_slice(), &want), "index {index}");
    }
    assert_own_hooks(&v);
    let bytes = std::fs::read(out.join("chosen/direction.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["projected"], "true");
    let card = std::fs::read_to_string(out.join("model/README.md")).unwrap();
    assert!(card.contains("find's candidates projected (each without its component along the harmless mean"), "{card}");

    // The same search reads find's outputs; without the means file it cannot project.
    let other = tmp.path().join("p");
    std::fs::create_dir_all(other.join("find")).unwrap();
    for f in ["candidates.safetensors", "direction.safetensors"] {
        std::fs::copy(out.join("find").join(f), other.join("find").join(f)).unwrap();
    }
    let r = optimize(&other, 1, &["--projected", "search"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        r.stderr.trim_end(),
        format!(
            "error: --projected search needs find's harmless means `{}`, which this find output lacks (an older \
             abliterate wrote it); remove `{}` to run find again",
            other.join("find/means.safetensors").display(),
            other.join("find").display()
        )
    );
}
