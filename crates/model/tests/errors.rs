//! Bad input is an `Err` naming the problem, never a panic: configs the runtime cannot follow, tensors a
//! config implies but the checkpoint lacks, out-of-range token ids and mismatched inputs.

use std::path::{Path, PathBuf};

use model::{Batch, Logits, Model, ModelError, NoHook};
use serde_json::Value;

/// A copy of the llama fixture with config.json edited by `edit`.
fn with_config(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> (tempfile::TempDir, PathBuf) {
    let src = testutil::fixtures().join("models/llama/f32");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    match Model::open(dir) {
        Ok(_) => panic!("`{}` loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configs_the_runtime_cannot_follow_are_named() {
    let (_t, dir) = with_config(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "mrope", "factor": 2.0}));
    });
    assert_eq!(
        load_error(&dir),
        "`rope_scaling` type `mrope` (supported: default, linear, dynamic, llama3, yarn, longrope) is not supported by the runtime yet"
    );
    let (_t, dir) = with_config(|c| {
        c.insert("hidden_act".into(), "xielu".into());
    });
    assert_eq!(
        load_error(&dir),
        "activation `xielu` (`hidden_act` in config.json) is not supported by the runtime yet"
    );
    let (_t, dir) = with_config(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear"}));
    });
    assert_eq!(
        load_error(&dir),
        format!("`{}`: `rope_scaling.factor` is missing or not a number", dir.join("config.json").display())
    );
    let (_t, dir) = with_config(|c| {
        c.insert("rms_norm_eps".into(), (-1.0).into());
    });
    assert_eq!(
        load_error(&dir),
        format!("`{}`: `rms_norm_eps` -1 must be positive", dir.join("config.json").display())
    );
}

#[test]
fn a_tensor_the_config_implies_but_the_checkpoint_lacks_is_named() {
    let (_t, dir) = with_config(|c| {
        c.insert("attention_bias".into(), true.into());
    });
    assert_eq!(
        load_error(&dir),
        "tensor `model.layers.0.self_attn.q_proj.bias` is missing from the checkpoint; the llama forward pass needs it"
    );
}

#[test]
fn inputs_are_checked_before_use() {
    let model = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let e = model.forward(&Batch::new(&[vec![1, 2, 512]]).unwrap(), Logits::Last, &mut NoHook).unwrap_err();
    assert!(matches!(e, ModelError::Token { .. }));
    assert_eq!(e.to_string(), "token id 512 (prompt 0, position 2) is outside the vocabulary of 512 ids");
    let batch = Batch::new(&[vec![1, 2, 3]]).unwrap();
    let e = model.forward_from(1, vec![0.0; 10], &batch, Logits::Last, &mut NoHook).unwrap_err();
    assert_eq!(e.to_string(), "the residual has 10 values; 3 tokens x hidden size 64 need 192");
    let e = model.forward_from(3, vec![0.0; 192], &batch, Logits::Last, &mut NoHook).unwrap_err();
    assert_eq!(e.to_string(), "cannot start at layer 3: the model has 2 layers");
    // Starting after the last layer is the final norm and head on the given residual.
    let out = model.forward_from(2, vec![0.0; 192], &batch, Logits::Last, &mut NoHook).unwrap();
    assert_eq!(out.rows(), 1);
}

/// Sizes in config.json are checked against the tensors present before anything is allocated from
/// them (an absurd size used to allocate first: an abort, not an error).
#[test]
fn absurd_config_sizes_are_errors_before_any_allocation() {
    let config = |dir: &Path| dir.join("config.json").display().to_string();
    let (_t, dir) = with_config(|c| {
        c.insert("vocab_size".into(), (1u64 << 50).into());
    });
    assert_eq!(
        load_error(&dir),
        "tensor `model.embed_tokens.weight` has shape [512, 64], but config.json implies [1125899906842624, 64]"
    );
    let (_t, dir) = with_config(|c| {
        c.insert("num_hidden_layers".into(), 1_000_000_000_000u64.into());
    });
    assert_eq!(
        load_error(&dir),
        format!("`{}`: `num_hidden_layers` is 1000000000000, but the checkpoint holds only 20 tensors", config(&dir))
    );
    let (_t, dir) = with_config(|c| {
        c.insert("intermediate_size".into(), (1u64 << 60).into());
    });
    assert_eq!(
        load_error(&dir),
        "tensor `model.layers.0.mlp.gate_proj.weight` has shape [96, 64], but config.json implies [1152921504606846976, 64]"
    );
    let (_t, dir) = with_config(|c| {
        c.insert("head_dim".into(), (1u64 << 62).into());
    });
    assert_eq!(
        load_error(&dir),
        "num_attention_heads x head_dim (4 x 4611686018427387904, too large) is not supported by the runtime yet"
    );
}

/// The KV cache is sized by the prompt and `max_new_tokens`, bounded by the model's context length.
#[test]
fn generation_beyond_the_context_is_an_error() {
    use model::GenerateOptions;
    let model = Model::open(&testutil::fixtures().join("models/llama/f32")).unwrap();
    let batch = Batch::new(&[vec![1, 2, 3], vec![4]]).unwrap();
    let run = |max_new_tokens| {
        let opts = GenerateOptions { max_new_tokens, stop_tokens: vec![] };
        model.generate(&batch, &opts, &mut NoHook, &mut |_, _| std::ops::ControlFlow::Continue(()))
    };
    for n in [usize::MAX, 511] {
        assert_eq!(
            run(n).unwrap_err().to_string(),
            format!(
                "prompt 0 has 3 tokens; with {n} new tokens that is more than the model's context of 512 positions \
                 (max_position_embeddings)"
            )
        );
    }
    // 3 prompt positions and 509 fed-back tokens fill the 512 positions exactly.
    assert_eq!(run(510).unwrap()[0].tokens.len(), 510);
}
