//! `abliterate edit` end to end: the real binary on small checkpoints built by the test
//! (`testutil::synth`), checking the output files byte by byte, the manifest, the options, and every
//! bad input with its exact message. The input is hashed before and after every run.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint::{Checkpoint, Dtype, Shard};
use serde_json::Value;
use testutil::synth;
use util::{Run, abliterate};

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_abliterate"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Setup {
    tmp: tempfile::TempDir,
    model: PathBuf,
    direction: PathBuf,
    before: BTreeMap<String, String>,
}

impl Setup {
    fn new(model: impl FnOnce(&Path) -> PathBuf) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let model = model(tmp.path());
        let direction = synth::direction_file(tmp.path(), synth::HIDDEN);
        let before = synth::hash_dir(&model);
        Setup { tmp, model, direction, before }
    }

    fn tied_llama() -> Setup {
        Setup::new(|p| synth::llama(p, Dtype::BF16, true))
    }

    fn out(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn edit(&self, out: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["edit", s(&self.model), "--direction", s(&self.direction), "-o", s(out)];
        args.extend_from_slice(extra);
        abliterate(&args)
    }

    /// The input is never modified, whatever happened.
    fn assert_input_untouched(&self) {
        assert_eq!(synth::hash_dir(&self.model), self.before, "the input directory changed");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_input_untouched();
        }
    }
}

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("abliterate.json")).unwrap()).unwrap()
}

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
}

fn embedding_bytes(model: &Path) -> Vec<u8> {
    let c = Checkpoint::open(model).unwrap();
    let (r, _) = c.get("model.embed_tokens.weight").unwrap();
    c.bytes(r).to_vec()
}

#[test]
fn edits_a_tied_llama_and_keeps_every_other_byte() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    let r = t.edit(&out, &[]);
    ok(&r);
    assert!(r.stdout.starts_with(&format!("edited `{}` into `{}` in ", t.model.display(), out.display())));
    assert!(r.stdout.contains("rewrote 5 tensors (1 embedding, 2 attn_out, 2 mlp_down)"), "{}", r.stdout);

    let changed = synth::assert_same_layout(&t.model, &out);
    assert_eq!(
        changed,
        [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
        ]
    );
    // Untied by default: lm_head.weight is the original embedding, appended to the same shard.
    let edited = Checkpoint::open(&out).unwrap();
    let (r_head, head) = edited.get("lm_head.weight").unwrap();
    assert_eq!(edited.bytes(r_head), &embedding_bytes(&t.model)[..]);
    assert_eq!(head.shape, [synth::VOCAB, synth::HIDDEN]);
    assert!(!edited.config.tie_word_embeddings && !edited.tied());
    // config.json: only tie_word_embeddings changed, key order kept.
    let cfg: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let orig: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(t.model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg.keys().collect::<Vec<_>>(), orig.keys().collect::<Vec<_>>());
    for (k, v) in &orig {
        if k != "tie_word_embeddings" {
            assert_eq!(&cfg[k], v);
        }
    }
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(t.model.join("tokenizer.json")).unwrap()
    );

    // The manifest: hashes of every input and output file, the direction, the ledger.
    let m = manifest(&out);
    let ins = synth::hash_dir(&t.model);
    let listed: BTreeMap<String, String> = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(listed, ins);
    let mut outs = synth::hash_dir(&out);
    outs.remove("abliterate.json");
    let listed: BTreeMap<String, String> = m["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["sha256"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(listed, outs);
    assert_eq!(m["direction"]["sha256"], direction::sha256_hex(&std::fs::read(&t.direction).unwrap()));
    assert_eq!(m["tie"], "untied");
    let ledger = m["edited"].as_array().unwrap();
    assert_eq!(ledger.len(), 5);
    for l in ledger {
        let (before, after, ratio) =
            (l["proj_before"].as_f64().unwrap(), l["proj_after"].as_f64().unwrap(), l["ratio"].as_f64().unwrap());
        assert!(before > 0.1, "{l}");
        // bf16 rounding leaves |r̂ᵀW'| at about u·sqrt(Σ|W|²)-ish, far below the original.
        assert!(ratio < 0.02 && after < before * 0.02, "{l}");
        assert!(l["max_abs_change"].as_f64().unwrap() > 0.0);
        assert!(l["proj_before_rel_frobenius"].as_f64().unwrap() > l["proj_after_rel_frobenius"].as_f64().unwrap());
    }
}

#[test]
fn output_is_byte_identical_across_runs_and_thread_counts() {
    let t = Setup::new(|p| synth::llama_sharded(p, Dtype::BF16, true, 3));
    let mut hashes = Vec::new();
    for (name, threads) in [("one", "1"), ("two", "2"), ("again", "2")] {
        let out = t.out(name);
        let r = run_env(
            &["edit", s(&t.model), "--direction", s(&t.direction), "-o", s(&out)],
            &[("RAYON_NUM_THREADS", threads)],
        );
        ok(&r);
        hashes.push(synth::hash_dir(&out));
    }
    assert_eq!(hashes[0], hashes[1], "RAYON_NUM_THREADS=1 and 2 differ");
    assert_eq!(hashes[1], hashes[2], "two runs differ");
    // Issue 13: `--threads`, the option every computing command shares, says the same.
    for threads in ["1", "3"] {
        let out = t.out(&format!("threads-{threads}"));
        ok(&t.edit(&out, &["--threads", threads]));
        assert_eq!(synth::hash_dir(&out), hashes[0], "--threads {threads}");
    }
    let r = t.edit(&t.out("zero"), &["--threads", "0"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("invalid value '0' for '--threads <N>'"), "{}", r.stderr);
}

#[test]
fn sharded_untie_appends_lm_head_to_the_embedding_shard_and_updates_the_index() {
    let t = Setup::new(|p| synth::llama_sharded(p, Dtype::F32, true, 3));
    let out = t.out("out");
    ok(&t.edit(&out, &[]));
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let orig: Value =
        serde_json::from_slice(&std::fs::read(t.model.join("model.safetensors.index.json")).unwrap()).unwrap();
    let emb_shard = orig["weight_map"]["model.embed_tokens.weight"].as_str().unwrap();
    assert_eq!(index["weight_map"]["lm_head.weight"], emb_shard);
    let added = (synth::VOCAB * synth::HIDDEN * 4) as u64;
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        orig["metadata"]["total_size"].as_u64().unwrap() + added
    );
    let shard = Shard::open(&out.join(emb_shard), emb_shard).unwrap();
    let last = shard.header.tensors.last().unwrap();
    assert_eq!(last.name, "lm_head.weight");
    assert_eq!(shard.tensor_bytes(last), &embedding_bytes(&t.model)[..]);
    let edited = Checkpoint::open(&out).unwrap();
    assert!(!edited.tied());
}

#[test]
fn keep_tie_leaves_the_tie_and_says_the_unembedding_changes() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    let r = t.edit(&out, &["--keep-tie"]);
    ok(&r);
    assert!(r.stdout.contains("the edit also changes the unembedding"), "{}", r.stdout);
    let edited = Checkpoint::open(&out).unwrap();
    assert!(edited.tied() && edited.get("lm_head.weight").is_none());
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), std::fs::read(t.model.join("config.json")).unwrap());
    assert_eq!(manifest(&out)["tie"], "kept_tie");
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
}

#[test]
fn an_untied_model_gets_no_extra_head() {
    let t = Setup::new(|p| synth::llama(p, Dtype::BF16, false));
    let out = t.out("out");
    ok(&t.edit(&out, &[]));
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
    let a = Checkpoint::open(&t.model).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    assert_eq!(a.tensors().count(), b.tensors().count(), "nothing added");
    assert_eq!(manifest(&out)["tie"], "not_tied");
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), std::fs::read(t.model.join("config.json")).unwrap());
}

#[test]
fn skip_embeddings_layers_exclude_and_scale_select_what_is_edited() {
    let t = Setup::tied_llama();
    // --skip-embeddings on a tied model: the head is unchanged, so the tie stays.
    let out = t.out("skip");
    ok(&t.edit(&out, &["--skip-embeddings"]));
    let changed = synth::assert_same_layout(&t.model, &out);
    assert_eq!(changed.len(), 4);
    assert!(!changed.iter().any(|n| n.contains("embed")));
    assert!(Checkpoint::open(&out).unwrap().tied());
    assert_eq!(manifest(&out)["tie"], "tied_unedited");

    // --layers 1: layer 0's writers are untouched; the embedding (no layer) is still edited.
    let out = t.out("layers");
    ok(&t.edit(&out, &["--layers", "1"]));
    assert_eq!(
        synth::assert_same_layout(&t.model, &out),
        ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    );
    let m = manifest(&out);
    let excluded: Vec<(&str, &str)> = m["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        excluded,
        [("model.layers.0.self_attn.o_proj.weight", "--layers"), ("model.layers.0.mlp.down_proj.weight", "--layers")]
    );
    assert_eq!(m["options"]["layers"], "1");

    // --exclude: matching writers are copied unchanged and reported with their pattern.
    let out = t.out("exclude");
    let r = t.edit(&out, &["--exclude", "*.o_proj.weight", "--exclude", "nothing.*"]);
    ok(&r);
    assert_eq!(r.stderr, "warning: --exclude `nothing.*` matched no tensor\n");
    assert_eq!(
        synth::assert_same_layout(&t.model, &out),
        ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    );
    let m = manifest(&out);
    assert_eq!(m["exclude_patterns"][0]["matched"], 2);
    assert_eq!(m["exclude_patterns"][1]["matched"], 0);
    assert_eq!(m["excluded"][0]["reason"], "--exclude `*.o_proj.weight`");

    // --scale 0.5 removes half of the component (method.md §6, scale variant).
    let out = t.out("half");
    ok(&t.edit(&out, &["--scale", "0.5"]));
    for l in manifest(&out)["edited"].as_array().unwrap() {
        let ratio = l["ratio"].as_f64().unwrap();
        assert!((ratio - 0.5).abs() < 0.02, "{l}");
    }
}

#[test]
fn an_unknown_tensor_is_an_error_unless_excluded() {
    let t = Setup::new(|p| {
        let dir = p.join("odd");
        std::fs::create_dir(&dir).unwrap();
        synth::write_config(&dir, &synth::llama_config(false));
        let mut tensors = synth::llama_tensors(Dtype::BF16, false);
        tensors.push(synth::Tensor::random("model.extra.weight", Dtype::BF16, &[4], 3, 1.0));
        synth::write_safetensors(&dir.join("model.safetensors"), None, &tensors);
        dir
    });
    let out = t.out("out");
    let r = t.edit(&out, &[]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        "error: 1 unknown tensor in `model.safetensors`: `model.extra.weight`; abliterate does not know whether it \
         writes to the residual stream. Exclude it explicitly with --exclude if it is safe to leave unedited\n"
    );
    assert!(!out.exists());
    ok(&t.edit(&out, &["--exclude", "model.extra.*"]));
    let m = manifest(&out);
    assert_eq!(m["excluded"][0]["name"], "model.extra.weight");
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    let r = t.edit(&out, &["--dry-run"]);
    ok(&r);
    assert!(r.stdout.starts_with(&format!("plan for `{}` (llama, 2 layers, hidden 64) with `", t.model.display())));
    assert!(r.stdout.contains("  rewrite: 5 tensors, 61.4 kB (1 embedding, 2 attn_out, 2 mlp_down)\n"), "{}", r.stdout);
    assert!(r.stdout.contains(
        "  add: `lm_head.weight` to `model.safetensors` (12.3 kB, a copy of the original `model.embed_tokens.weight`)\n"
    ));
    assert!(
        r.stdout.contains("    model.layers.1.self_attn.o_proj.weight  attn_out  BF16 [64, 64]  scale 1  against r\n")
    );
    assert!(!out.exists());
    // Without -o too; and as JSON.
    let r = abliterate(["edit", s(&t.model), "--direction", s(&t.direction), "--dry-run", "--json"]);
    ok(&r);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["edited"].as_array().unwrap().len(), 5);
    assert_eq!(v["added"][0]["name"], "lm_head.weight");
    assert_eq!(v["tie"], "untied");
    let entries: Vec<_> = std::fs::read_dir(t.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 2, "only the model and the direction: {entries:?}");
}

#[test]
fn json_summary_is_machine_readable() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    let r = t.edit(&out, &["--json"]);
    ok(&r);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["edited_tensors"], 5);
    assert_eq!(v["edited_by_kind"]["attn_out"], 2);
    assert_eq!(v["tie"], "untied");
    assert_eq!(v["manifest"], s(&out.join("abliterate.json")));
    assert!(v["max_ratio"].as_f64().unwrap() < 0.02);
    assert_eq!(v["ledger"].as_array().unwrap().len(), 5);
}

#[test]
fn force_replaces_an_existing_output_only_after_success() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "old").unwrap();
    let r = t.edit(&out, &[]);
    assert_eq!(r.code, 2);
    assert_eq!(
        r.stderr,
        format!(
            "error: output `{}` already exists; choose another -o, or pass --force to replace it once the edit has succeeded\n",
            out.display()
        )
    );
    // A failing --force run (bad direction) keeps the old output.
    let bad = t.tmp.path().join("bad.safetensors");
    direction::write(&bad, &[0.0; synth::HIDDEN], Dtype::F32, &Default::default()).unwrap();
    let r = abliterate(["edit", s(&t.model), "--direction", s(&bad), "-o", s(&out), "--force"]);
    assert_eq!(r.code, 2);
    assert!(out.join("old.txt").exists());
    ok(&t.edit(&out, &["--force"]));
    assert!(!out.join("old.txt").exists());
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
    let left: Vec<_> = std::fs::read_dir(t.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with('.')), "no temporary leftovers: {left:?}");
}

/// Runs a failing edit and checks the exact message, exit code 2, and that no OUT appeared.
fn fails(t: &Setup, out: &Path, extra: &[&str], want: &str) {
    let existed = out.exists();
    let r = t.edit(out, extra);
    assert_eq!((r.code, r.stderr.as_str()), (2, want), "stdout: {}", r.stdout);
    assert_eq!(out.exists(), existed, "no partial output");
}

#[test]
fn bad_directions_are_refused_with_what_is_wrong() {
    let t = Setup::tied_llama();
    let out = t.out("out");
    let cases: [(&str, Vec<f64>, String); 3] = [
        ("short", vec![1.0; 32], "`direction` has length 32 but the model's hidden_size is 64".into()),
        (
            "nan",
            (0..64).map(|i| if i == 3 { f64::NAN } else { 1.0 }).collect(),
            "`direction` contains NaN (at index 3)".into(),
        ),
        ("zero", vec![0.0; 64], "`direction` is the zero vector, which has no direction".into()),
    ];
    for (name, values, problem) in cases {
        let p = t.tmp.path().join(format!("{name}.safetensors"));
        direction::write(&p, &values, Dtype::F32, &Default::default()).unwrap();
        let r = abliterate(["edit", s(&t.model), "--direction", s(&p), "-o", s(&out)]);
        assert_eq!(r.code, 2);
        assert_eq!(r.stderr, format!("error: direction file `{}`: {problem}\n", p.display()));
        assert!(!out.exists());
    }
}

/// `--candidate POS,LAYER` takes one candidate of `find`'s candidates file; the result is the edit with
/// that vector as a direction file, byte for byte except the manifest's record of where it came from.
#[test]
fn a_candidate_of_a_candidates_file_edits_like_its_direction_file() {
    let t = Setup::tied_llama();
    let d = direction::Direction::load(&t.direction, synth::HIDDEN).unwrap();
    // 2 positions x 3 layers; the chosen (-1, 1) is the synthetic direction, the others differ.
    let mut values = Vec::new();
    for i in 0..6 {
        values.extend(d.values.iter().map(|v| if i == 4 { *v } else { v * (i as f64 + 2.0) - 0.5 }));
    }
    let cands = t.tmp.path().join("candidates.safetensors");
    direction::Candidates::write(&cands, &values, &[-2, -1], 3, Dtype::F32, &Default::default()).unwrap();
    let (a, b) = (t.out("from-direction"), t.out("from-candidate"));
    ok(&t.edit(&a, &[]));
    ok(&abliterate(["edit", s(&t.model), "--direction", s(&cands), "--candidate", "-1,1", "-o", s(&b)]));
    // Every tensor is identical; only the records of the direction file's sha256 differ.
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let names: Vec<String> = ca.tensors().map(|(_, e)| e.name.clone()).collect();
    assert_eq!(names, cb.tensors().map(|(_, e)| e.name.clone()).collect::<Vec<_>>());
    for (ra, e) in ca.tensors() {
        let (rb, _) = cb.get(&e.name).unwrap();
        assert!(ca.bytes(ra) == cb.bytes(rb), "tensor `{}` differs", e.name);
    }
    let m = manifest(&b);
    assert_eq!(
        (m["direction"]["metadata"]["position"].as_str(), m["direction"]["metadata"]["layer"].as_str()),
        (Some("-1"), Some("1"))
    );
    let r = abliterate(["edit", s(&t.model), "--direction", s(&cands), "-o", s(&t.out("x"))]);
    assert_eq!(
        (r.code, r.stderr),
        (
            2,
            format!(
                "error: direction file `{}`: is a candidates file (tensor `candidates`); choose one with --candidate \
                 POS,LAYER\n",
                cands.display()
            )
        )
    );
}

#[test]
fn outputs_that_would_touch_the_input_are_refused() {
    let t = Setup::tied_llama();
    fails(
        &t,
        &t.model,
        &[],
        &format!(
            "error: output `{}` is the model directory itself; the input is never modified, so choose another -o\n",
            t.model.display()
        ),
    );
    let inside = t.model.join("edited");
    fails(
        &t,
        &inside,
        &[],
        &format!(
            "error: output `{}` is inside the model directory `{}`; choose a directory outside it\n",
            inside.display(),
            t.model.display()
        ),
    );
    // Through a symlink to the model (as in a Hugging Face cache snapshot).
    let link = t.tmp.path().join("link");
    std::os::unix::fs::symlink(&t.model, &link).unwrap();
    let via = link.join("edited");
    fails(
        &t,
        &via,
        &[],
        &format!(
            "error: output `{}` is inside the model directory `{}`; choose a directory outside it\n",
            via.display(),
            t.model.display()
        ),
    );
    // --force on a directory that contains the model would delete it.
    fails(
        &t,
        t.tmp.path(),
        &["--force"],
        &format!(
            "error: output `{}` contains the input `{}`, so replacing it would delete the model; choose another -o\n",
            t.tmp.path().display(),
            t.model.display()
        ),
    );
}

/// A directory this process cannot write to: chmod for ordinary users, a read-only tmpfs for root
/// (root ignores permissions). None where neither works.
struct ReadOnly {
    dir: PathBuf,
    mounted: bool,
}

impl ReadOnly {
    fn new(dir: PathBuf) -> Option<ReadOnly> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(dir.join("probe"), "").is_err() {
            return Some(ReadOnly { dir, mounted: false });
        }
        std::fs::remove_file(dir.join("probe")).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", s(&dir)]).status();
        if st.is_ok_and(|s| s.success()) {
            return Some(ReadOnly { dir, mounted: true });
        }
        eprintln!("skipping: running as root and cannot mount a read-only tmpfs, so no unwritable directory exists");
        None
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}

#[test]
fn an_unwritable_output_directory_is_refused() {
    let t = Setup::tied_llama();
    let Some(ro) = ReadOnly::new(t.tmp.path().join("ro")) else { return };
    let out = ro.dir.join("out");
    let r = t.edit(&out, &[]);
    assert_eq!(r.code, 2);
    let why = if ro.mounted { "Read-only file system (os error 30)" } else { "Permission denied (os error 13)" };
    assert_eq!(r.stderr, format!("error: cannot write the output: `{}` is not writable ({why})\n", ro.dir.display()));
    assert!(!out.exists());
}

/// A small tmpfs, where mounting is allowed (the library test injects ENOSPC everywhere).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn new(dir: PathBuf, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(&dir)]).status();
        if st.is_ok_and(|s| s.success()) {
            Some(SmallDisk(dir))
        } else {
            eprintln!("skipping: cannot mount a small tmpfs here; write::tests covers a full disk by injection");
            None
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
    let t = Setup::new(|p| synth::llama(p, Dtype::F32, true));
    let Some(disk) = SmallDisk::new(t.tmp.path().join("small"), "128k") else { return };
    let out = disk.0.join("out");
    let r = t.edit(&out, &[]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stderr.starts_with("error: disk full while writing `model.safetensors` (the edited model needs "),
        "{}",
        r.stderr
    );
    assert!(r.stderr.ends_with(&format!(
        " in `{}`); nothing was left behind: the temporary output was removed. Free some space or choose another -o\n",
        out.display()
    )));
    assert_eq!(std::fs::read_dir(&disk.0).unwrap().count(), 0, "the temporary directory was removed");
}

#[test]
fn checkpoint_errors_reach_the_user_unchanged() {
    // No config.json.
    let t = Setup::new(|p| {
        let dir = p.join("empty");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        dir
    });
    let out = t.out("out");
    fails(
        &t,
        &out,
        &[],
        &format!(
            "error: `{}` not found: MODEL must be a Hugging Face model directory with a config.json\n",
            t.model.join("config.json").display()
        ),
    );

    // A truncated shard.
    let t = Setup::new(|p| {
        let dir = synth::llama(p, Dtype::BF16, false);
        let f = dir.join("model.safetensors");
        let len = std::fs::metadata(&f).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(len - 100).unwrap();
        dir
    });
    let out = t.out("out");
    let r = t.edit(&out, &[]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with("error: `model.safetensors`: file is truncated: its header describes "),
        "{}",
        r.stderr
    );
    assert!(!out.exists());

    // A writer whose shape contradicts config.json.
    let t = Setup::new(|p| {
        let dir = p.join("shape");
        std::fs::create_dir(&dir).unwrap();
        synth::write_config(&dir, &synth::llama_config(false));
        let mut tensors = synth::llama_tensors(Dtype::BF16, false);
        let o = tensors.iter_mut().find(|t| t.name == "model.layers.1.mlp.down_proj.weight").unwrap();
        *o = synth::Tensor::random(&o.name, Dtype::BF16, &[synth::HIDDEN, 100], 5, 0.2);
        synth::write_safetensors(&dir.join("model.safetensors"), None, &tensors);
        dir
    });
    fails(
        &t,
        &t.out("out"),
        &[],
        "error: tensor `model.layers.1.mlp.down_proj.weight` in `model.safetensors`: shape [64, 100] contradicts \
         config.json (hidden_size 64, intermediate_size 128)\n",
    );
}

/// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`, transformers 4.50 layout):
/// the text model under `language_model.model.`, a vision tower, and the text settings in
/// `text_config` (where transformers reads `tie_word_embeddings`).
fn multimodal_gemma3(parent: &Path) -> PathBuf {
    let src = util::fixture("models/gemma3/bf16");
    let dir = parent.join("gemma3-mm");
    std::fs::create_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&src).unwrap();
    let mut tensors: Vec<synth::Tensor> = ckpt
        .tensors()
        .map(|(_, t)| synth::Tensor {
            name: t.name.replacen("model.", "language_model.model.", 1),
            dtype: t.dtype,
            shape: t.shape.clone(),
            values: ckpt.read_f32(&t.name).unwrap().iter().map(|v| *v as f64).collect(),
        })
        .collect();
    tensors.push(synth::Tensor::random(
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        Dtype::BF16,
        &[8, 3, 2, 2],
        11,
        0.1,
    ));
    tensors.push(synth::Tensor::random(
        "multi_modal_projector.mm_input_projection_weight",
        Dtype::BF16,
        &[8, 64],
        12,
        0.1,
    ));
    synth::write_safetensors(&dir.join("model.safetensors"), None, &tensors);
    let mut text: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    text.remove("tie_word_embeddings"); // Gemma's default: tied
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    });
    synth::write_config(&dir, &config);
    dir
}

#[test]
fn multimodal_gemma3_is_untied_where_transformers_reads_it() {
    let t = Setup::new(multimodal_gemma3);
    let out = t.out("out");
    ok(&t.edit(&out, &[]));
    let changed = synth::assert_same_layout(&t.model, &out);
    assert_eq!(changed.len(), 5, "embedding, 2 o_proj, 2 down_proj; the vision tower untouched: {changed:?}");
    assert!(changed.iter().all(|n| n.starts_with("language_model.model.")));
    let edited = Checkpoint::open(&out).unwrap();
    let (rh, _) = edited.get("language_model.lm_head.weight").expect("the head sits beside the text model");
    let input = Checkpoint::open(&t.model).unwrap();
    let (re, _) = input.get("language_model.model.embed_tokens.weight").unwrap();
    assert_eq!(edited.bytes(rh), input.bytes(re));
    let cfg: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["text_config"]["tie_word_embeddings"], false);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert!(!edited.tied());
    // The post-norm writers were edited against the gain-weighted direction.
    let m = manifest(&out);
    let against: Vec<&str> = m["edited"].as_array().unwrap().iter().map(|l| l["against"].as_str().unwrap()).collect();
    assert_eq!(against.iter().filter(|a| a.starts_with("s(language_model.model.layers.")).count(), 4);
}

#[test]
fn a_hugging_face_cache_snapshot_of_links_is_read_through_and_protected() {
    let t = Setup::new(|p| {
        // hub/models--x/{blobs/<hash>, snapshots/<rev>/<name> -> ../../blobs/<hash>}
        let src = synth::llama(p, Dtype::BF16, true);
        let repo = p.join("hub/models--x");
        let (blobs, snap) = (repo.join("blobs"), repo.join("snapshots/0123abcd"));
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let hash = direction::sha256_hex(&bytes);
            std::fs::write(blobs.join(&hash), bytes).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{hash}"), snap.join(e.file_name())).unwrap();
        }
        std::fs::remove_dir_all(&src).unwrap();
        snap
    });
    let out = t.out("out");
    ok(&t.edit(&out, &[]));
    assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5);
    for e in std::fs::read_dir(&out).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_file(), "{:?} is a regular file, not a link", e.file_name());
    }
    // --force onto the blobs folder would delete what the snapshot links to.
    let blobs = t.tmp.path().join("hub/models--x/blobs");
    let r = t.edit(&blobs, &["--force"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with(&format!("error: output `{}` contains the input `{}", blobs.display(), t.model.display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.ends_with("`, so replacing it would delete the model; choose another -o\n"), "{}", r.stderr);
}

#[test]
fn editing_an_edited_model_keeps_the_history() {
    let t = Setup::tied_llama();
    let once = t.out("once");
    ok(&t.edit(&once, &[]));
    let twice = t.out("twice");
    let r = abliterate(["edit", s(&once), "--direction", s(&t.direction), "-o", s(&twice), "--scale", "0.5"]);
    ok(&r);
    let m = manifest(&twice);
    assert_eq!(m["previous_edit"], manifest(&once), "the first manifest travels inside the second");
    assert_eq!(m["tie"], "not_tied", "already untied by the first edit");
    assert!(!m["inputs"].as_array().unwrap().iter().any(|f| f["path"] == "abliterate.json"));
}

#[test]
fn a_killed_run_leaves_no_output_and_its_leftovers_are_cleaned_later() {
    // Big enough (~45 MB) that the run is still writing when it is killed.
    let t = Setup::new(|p| {
        let dir = p.join("big");
        std::fs::create_dir(&dir).unwrap();
        let (d, ff, v) = (512, 2048, 8192);
        let mut config = synth::llama_config(true);
        config["hidden_size"] = d.into();
        config["intermediate_size"] = ff.into();
        config["vocab_size"] = v.into();
        config["num_hidden_layers"] = 4.into();
        config["num_attention_heads"] = 8.into();
        config["num_key_value_heads"] = 8.into();
        synth::write_config(&dir, &config);
        let mut tensors = vec![synth::Tensor::random("model.embed_tokens.weight", Dtype::BF16, &[v, d], 1, 1.0)];
        for l in 0..4 {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![d]),
                ("self_attn.q_proj.weight", vec![d, d]),
                ("self_attn.k_proj.weight", vec![d, d]),
                ("self_attn.v_proj.weight", vec![d, d]),
                ("self_attn.o_proj.weight", vec![d, d]),
                ("post_attention_layernorm.weight", vec![d]),
                ("mlp.gate_proj.weight", vec![ff, d]),
                ("mlp.up_proj.weight", vec![ff, d]),
                ("mlp.down_proj.weight", vec![d, ff]),
            ] {
                tensors.push(synth::Tensor::random(&p(name), Dtype::BF16, &shape, l as u64 + 2, 0.1));
            }
        }
        tensors.push(synth::Tensor::random("model.norm.weight", Dtype::BF16, &[d], 9, 0.1));
        synth::write_safetensors(&dir.join("model.safetensors"), None, &tensors);
        dir
    });
    let direction = t.tmp.path().join("d512.safetensors");
    let values: Vec<f64> = (0..512).map(|i| ((i * 37 % 101) as f64 - 50.0) / 50.0).collect();
    direction::write(&direction, &values, Dtype::F32, &Default::default()).unwrap();
    let out = t.out("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_abliterate"))
        .args(["edit", s(&t.model), "--direction", s(&direction), "-o", s(&out)])
        .spawn()
        .unwrap();
    let temp = t.tmp.path().join(format!(".out.abliterate-tmp-{}", child.id()));
    let started = std::time::Instant::now();
    while !temp.join("model.safetensors").exists() {
        assert!(started.elapsed().as_secs() < 60, "the run never started writing");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed run leaves no OUT");
    assert!(temp.exists(), "(SIGKILL cannot be cleaned up after)");
    // The next run removes the dead run's temporary directory and succeeds.
    let r = abliterate(["edit", s(&t.model), "--direction", s(&direction), "-o", s(&out)]);
    ok(&r);
    assert!(!temp.exists(), "stale temporary directory removed");
}

#[test]
fn help_snapshot() {
    let r = abliterate(["edit", "--help"]);
    ok(&r);
    expect_test::expect![[r#"
        Write a copy of a checkpoint in which no weight writes a direction into the residual stream

        Usage: abliterate edit [OPTIONS] --direction <FILE> <MODEL>

        Arguments:
          <MODEL>  Model directory: a Hugging Face checkpoint (config.json and safetensors weights)

        Options:
              --direction <FILE>
                  Direction file: safetensors with a 1-D `direction` tensor of length hidden_size (any norm); or a subspace file (`direction` [k, hidden]: remove all k directions, W' = W − V Vᵀ W); or a per-layer file (`directions` [layers, hidden] or [layers, k, hidden]); see docs/variants.md and `abliterate direction`
              --candidate <POS,LAYER>
                  With a candidates file (`find`'s candidates.safetensors): which candidate to remove, as POS,LAYER (e.g. `-1,22`: the last prompt token, the residual entering layer 22)
          -o, --output <OUT>
                  Output directory. Written beside it as a temporary directory and renamed when complete
              --scale <S>
                  Remove S times the projection: 1 is the paper's edit, between 0 and 1 attenuates, 2 reflects (docs/method.md §6, scale) [default: 1]
              --layers <RANGE>
                  Edit only the writers of these decoder layers, e.g. `0-10,12`. The embedding belongs to no layer and is edited regardless (use --skip-embeddings to leave it)
              --skip-embeddings
                  Leave the token embedding unedited
              --exclude <PATTERN>
                  Copy tensors whose name matches this glob unchanged (repeatable). Also the way to accept an unknown tensor you know does not write to the residual stream. Reported in the manifest
              --keep-tie
                  With tied embeddings, keep the tie: the edit then also changes the unembedding, so the model is no longer equivalent to ablation. By default the original embedding is written as an untied lm_head.weight
              --norm-preserving
                  Restore the norm of every vector a writer adds to the residual stream after removing the direction (each column of a weight, each row of the embedding; docs/variants.md)
              --kernel-attn <PEAK,POS,MIN,WIDTH>
                  Layer kernel for the attention output writers: PEAK,POSITION,MIN,WIDTH (heretic's tent: PEAK at layer POSITION, falling linearly to MIN at distance WIDTH, 0 beyond); multiplies --scale
              --kernel-mlp <PEAK,POS,MIN,WIDTH>
                  Layer kernel for the MLP down projections (experts included), as --kernel-attn
              --embedding-weight <W>
                  Weight of the embedding's edit (it belongs to no layer); 0 leaves it unedited
              --kernel-table <FILE>
                  Layer kernel as an explicit table: JSON {"attn": [w_0, ...], "mlp": [...], "embedding": w}
              --dry-run
                  Print the plan (what would be rewritten, added and excluded) and write nothing
              --force
                  Replace OUT if it exists (only after the new one is complete)
              --json
                  Print a machine-readable summary on stdout
              --threads <N>
                  Compute threads (default: one per core). Results do not depend on it
          -h, --help
                  Print help
          -V, --version
                  Print version
    "#]].assert_eq(&r.stdout);
}

/// A tiny f32 Llama whose config.json ties the head to the embedding although `lm_head.weight` is
/// stored too: an identical copy of the embedding, or a different tensor.
fn tied_llama_with_stored_head(parent: &Path, identical: bool) -> PathBuf {
    let dir = parent.join(if identical { "tied-copy" } else { "tied-stale" });
    std::fs::create_dir_all(&dir).unwrap();
    synth::write_config(&dir, &synth::llama_config(true));
    let mut tensors = synth::llama_tensors(Dtype::F32, false);
    if identical {
        let embedding = tensors[0].values.clone();
        tensors.last_mut().unwrap().values = embedding;
    }
    synth::write_safetensors(&dir.join("model.safetensors"), None, &tensors);
    dir
}

/// Issue 13: `edit` read a tied config with a stored `lm_head.weight` as untied and left the config
/// alone, while the runtime (like transformers 4.57) ignores the stored head and reads the embedding,
/// so the edited embedding silently became the output head. One rule now (`Checkpoint::head`): the
/// edited model's logits equal directional ablation of the model the runtime loads from the input.
#[test]
fn a_tied_config_with_a_stored_head_edits_to_directional_ablation() {
    use model::{Batch, Interventions, Logits, Model, NoHook};
    for identical in [false, true] {
        let t = Setup::new(|p| tied_llama_with_stored_head(p, identical));
        let out = t.out("out");
        let r = t.edit(&out, &["--json"]);
        ok(&r);
        let m = manifest(&out);
        assert_eq!(m["tie"], "untied");
        assert_eq!(m["added"].as_array().unwrap().len(), usize::from(!identical), "{}", m["added"]);
        let config: Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["tie_word_embeddings"], false);
        // Every loader now reads the same head: the original embedding, stored as lm_head.weight.
        let input = Checkpoint::open(&t.model).unwrap();
        let edited = Checkpoint::open(&out).unwrap();
        let (emb, _) = input.get("model.embed_tokens.weight").unwrap();
        let (head, _) = edited.get("lm_head.weight").unwrap();
        assert_eq!(edited.bytes(head), input.bytes(emb));
        assert_eq!(synth::assert_same_layout(&t.model, &out).len(), 5 + usize::from(!identical));

        let direction = edit::Direction::load(&t.direction, synth::HIDDEN).unwrap();
        let batch = Batch::new(&[vec![1, 5, 9, 20, 33, 70]]).unwrap();
        let mut ablation = Interventions::ablation(synth::LAYERS, &direction.values).unwrap();
        let want = Model::open(&t.model).unwrap().forward(&batch, Logits::All, &mut ablation).unwrap().logits;
        let got = Model::open(&out).unwrap().forward(&batch, Logits::All, &mut NoHook).unwrap().logits;
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "identical {identical}: max |logit diff| {diff} of {scale}");
        drop(input);
        drop(edited);

        // --keep-tie cannot keep such a tie unambiguous.
        let r = t.edit(&t.out("kept"), &["--keep-tie"]);
        assert_eq!(r.code, 2);
        assert_eq!(
            r.stderr,
            "error: --keep-tie: config.json ties the LM head to the embedding, but `lm_head.weight` is stored too \
             (transformers 4.57 ignores it; transformers 5 reads it where it differs from the embedding), so the \
             edited embedding would be the head for some loaders and not for others; edit without --keep-tie (the \
             head becomes the original embedding, untied)\n"
        );
    }
}

/// Issue 13 (the overlap check): an edit keeps every tensor at its offsets, whatever the layout the
/// input has (data in reverse header order, gaps between tensors, an empty tensor whose offsets
/// lie inside another tensor), and copies every byte outside the edited tensors, gaps included.
#[test]
fn unusual_layouts_keep_every_offset() {
    let t = Setup::new(|p| {
        let dir = p.join("odd-layout");
        std::fs::create_dir_all(&dir).unwrap();
        synth::write_config(&dir, &synth::llama_config(true));
        let tensors = synth::llama_tensors(Dtype::BF16, true);
        let mut data = Vec::new();
        let mut entries = Vec::new();
        for (k, tensor) in tensors.iter().enumerate().rev() {
            data.extend((0..13).map(|i| (i * 7 + k) as u8));
            let begin = data.len();
            checkpoint::dtype::encode_f64(tensor.dtype, &tensor.values, &mut data);
            entries.push(checkpoint::TensorEntry {
                name: tensor.name.clone(),
                dtype: tensor.dtype,
                shape: tensor.shape.clone(),
                begin,
                end: data.len(),
            });
        }
        let inside = entries.iter().find(|e| e.name == "model.embed_tokens.weight").unwrap().begin + 6;
        entries.push(checkpoint::TensorEntry {
            name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            dtype: Dtype::F32,
            shape: vec![0],
            begin: inside,
            end: inside,
        });
        data.extend_from_slice(b"trailing");
        let mut bytes = checkpoint::safetensors::write_header(None, &entries);
        bytes.extend_from_slice(&data);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        dir
    });
    let out = t.out("out");
    ok(&t.edit(&out, &[]));
    let changed = synth::assert_same_layout(&t.model, &out);
    assert_eq!(changed.len(), 5, "{changed:?}");
}
