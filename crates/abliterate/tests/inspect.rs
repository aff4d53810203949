//! `abliterate inspect` on the committed fixtures: snapshots of the human output (regenerate with
//! `UPDATE_EXPECT=1 cargo test -p abliterate --test inspect`) and the fields of `--json`, with the
//! expected sizes computed here from the fixtures' documented shapes.

mod util;

use std::path::Path;

use expect_test::{Expect, expect};
use serde_json::{Value, json};
use util::{abliterate, copy_dir, fixture};

fn inspect(dir: &Path) -> String {
    let run = abliterate(["inspect".as_ref(), dir.as_os_str()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "");
    run.stdout.replace(&dir.display().to_string(), "MODEL")
}

fn inspect_json(dir: &Path) -> Value {
    let run = abliterate(["inspect".as_ref(), dir.as_os_str(), "--json".as_ref()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

fn snapshot(rel: &str, want: Expect) {
    want.assert_eq(&inspect(&fixture(rel)));
}

#[test]
fn llama_bf16() {
    snapshot(
        "models/llama/bf16",
        expect![[r#"
            MODEL: llama (LlamaForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, vocab 512
            weights: 189.1 kB in `model.safetensors`, 20 tensors, bf16; config dtype bfloat16
            residual writers: 5 tensors, 106.5 kB
              embedding: `model.embed_tokens.weight` [512, 64] (65.5 kB, bf16)
              attn_out: layers 0-1 (2 tensors, 16.4 kB, bf16)
              mlp_down: layers 0-1 (2 tensors, 24.6 kB, bf16)
            other tensors: 15 (attn_in 6, final_norm 1, mlp_in 4, pre_norm 4)
            tied embeddings: yes (no `lm_head.weight` stored)
              the default edit unties them (docs/method.md §6): it adds `lm_head.weight` = the original embedding and sets tie_word_embeddings false
              --keep-tie keeps the tie and also edits the unembedding
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 5 tensors (106.5 kB), adds `lm_head.weight` (65.5 kB), copies 15 unchanged (82.6 kB)
        "#]],
    );
}

#[test]
fn llama_f32_sharded() {
    snapshot(
        "models/llama/f32",
        expect![[r#"
            MODEL: llama (LlamaForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, vocab 512
            weights: 378.1 kB in 2 shards, 20 tensors, f32; config dtype float32
              model-00001-of-00002.safetensors  205.6 kB  5 tensors
              model-00002-of-00002.safetensors  174.6 kB  15 tensors
            residual writers: 5 tensors, 213.0 kB
              embedding: `model.embed_tokens.weight` [512, 64] (131.1 kB, f32)
              attn_out: layers 0-1 (2 tensors, 32.8 kB, f32)
              mlp_down: layers 0-1 (2 tensors, 49.2 kB, f32)
            other tensors: 15 (attn_in 6, final_norm 1, mlp_in 4, pre_norm 4)
            tied embeddings: yes (no `lm_head.weight` stored)
              the default edit unties them (docs/method.md §6): it adds `lm_head.weight` = the original embedding and sets tie_word_embeddings false
              --keep-tie keeps the tie and also edits the unembedding
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 5 tensors (213.0 kB), adds `lm_head.weight` (131.1 kB), copies 15 unchanged (165.1 kB)
        "#]],
    );
}

#[test]
fn llama_with_output_biases() {
    snapshot(
        "models/llama_bias/f32",
        expect![[r#"
            MODEL: llama (LlamaForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, vocab 512
            weights: 381.7 kB in 2 shards, 34 tensors, f32; config dtype float32
              model-00001-of-00002.safetensors  206.9 kB  8 tensors
              model-00002-of-00002.safetensors  178.2 kB  26 tensors
            residual writers: 9 tensors, 214.0 kB
              embedding: `model.embed_tokens.weight` [512, 64] (131.1 kB, f32)
              attn_out: layers 0-1 (2 tensors, 32.8 kB, f32)
              attn_out_bias: layers 0-1 (2 tensors, 512 B, f32)
              mlp_down: layers 0-1 (2 tensors, 49.2 kB, f32)
              mlp_down_bias: layers 0-1 (2 tensors, 512 B, f32)
            other tensors: 25 (attn_in 12, final_norm 1, mlp_in 8, pre_norm 4)
            tied embeddings: yes (no `lm_head.weight` stored)
              the default edit unties them (docs/method.md §6): it adds `lm_head.weight` = the original embedding and sets tie_word_embeddings false
              --keep-tie keeps the tie and also edits the unembedding
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 9 tensors (214.0 kB), adds `lm_head.weight` (131.1 kB), copies 25 unchanged (167.7 kB)
        "#]],
    );
}

#[test]
fn gemma2_post_norms() {
    snapshot(
        "models/gemma2/bf16",
        expect![[r#"
            MODEL: gemma2 (Gemma2ForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, vocab 512
            weights: 189.6 kB in `model.safetensors`, 24 tensors, bf16; config dtype bfloat16
            residual writers: 5 tensors, 106.5 kB
              embedding: `model.embed_tokens.weight` [512, 64] (65.5 kB, bf16)
              attn_out: layers 0-1 (2 tensors, 16.4 kB, bf16)
              mlp_down: layers 0-1 (2 tensors, 24.6 kB, bf16)
            post-norms: layers 0-1 (4 tensors) scale each block's write by g = 1 + w
              so the edit removes ŝ = (g ⊙ r̂)/|g ⊙ r̂| of each layer from its writers (docs/method.md §6)
            other tensors: 15 (attn_in 6, final_norm 1, mlp_in 4, pre_norm 4)
            tied embeddings: yes (no `lm_head.weight` stored)
              the default edit unties them (docs/method.md §6): it adds `lm_head.weight` = the original embedding and sets tie_word_embeddings false
              --keep-tie keeps the tie and also edits the unembedding
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 5 tensors (106.5 kB), adds `lm_head.weight` (65.5 kB), copies 19 unchanged (83.1 kB)
        "#]],
    );
}

#[test]
fn mixtral_experts() {
    snapshot(
        "models/mixtral/bf16",
        expect![[r#"
            MODEL: mixtral (MixtralForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), 4 experts (top 2, width 32), vocab 512
            weights: 280.2 kB in `model.safetensors`, 41 tensors, bf16; config dtype bfloat16
            residual writers: 11 tensors, 114.7 kB
              embedding: `model.embed_tokens.weight` [512, 64] (65.5 kB, bf16)
              attn_out: layers 0-1 (2 tensors, 16.4 kB, bf16)
              expert_down: layers 0-1, 4 experts per layer (8 tensors, 32.8 kB, bf16)
            other tensors: 30 (attn_in 6, final_norm 1, lm_head 1, mlp_in 16, pre_norm 4, router 2)
            tied embeddings: no (`lm_head.weight` is stored)
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 11 tensors (114.7 kB), copies 30 unchanged (165.5 kB)
        "#]],
    );
}

#[test]
fn qwen2_moe_shared_expert() {
    snapshot(
        "models/qwen2_moe/bf16",
        expect![[r#"
            MODEL: qwen2_moe (Qwen2MoeForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, 4 experts (top 2, width 32, shared expert 48), vocab 512
            weights: 286.5 kB in `model.safetensors`, 41 tensors, bf16; config dtype bfloat16
            residual writers: 9 tensors, 116.7 kB
              embedding: `model.embed_tokens.weight` [512, 64] (65.5 kB, bf16)
              attn_out: layers 0-1 (2 tensors, 16.4 kB, bf16)
              mlp_down: layer 0 (1 tensor, 12.3 kB, bf16)
              expert_down: layer 1, 4 experts per layer (4 tensors, 16.4 kB, bf16)
              shared_expert_down: layer 1 (1 tensor, 6.1 kB, bf16)
            other tensors: 32 (attn_in 12, final_norm 1, lm_head 1, mlp_in 12, pre_norm 4, router 2)
            tied embeddings: no (`lm_head.weight` is stored)
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 9 tensors (116.7 kB), copies 32 unchanged (169.7 kB)
        "#]],
    );
}

#[test]
fn qwen3_moe_fused_experts() {
    snapshot(
        "models/qwen3_moe_fused/bf16",
        expect![[r#"
            MODEL: qwen3_moe (Qwen3MoeForCausalLM)
              2 layers, hidden 64, 4 heads (2 kv, head_dim 16), mlp 96, 4 experts (top 2, width 32), vocab 512
            weights: 267.5 kB in `model.safetensors`, 25 tensors, bf16; config dtype bfloat16
            residual writers: 5 tensors, 110.6 kB
              embedding: `model.embed_tokens.weight` [512, 64] (65.5 kB, bf16)
              attn_out: layers 0-1 (2 tensors, 16.4 kB, bf16)
              mlp_down: layer 1 (1 tensor, 12.3 kB, bf16)
              expert_down: layer 0, fused [4 experts, d, ff] (1 tensor, 16.4 kB, bf16)
            other tensors: 20 (attn_in 6, final_norm 1, lm_head 1, mlp_in 3, pre_norm 4, qk_norm 4, router 1)
            tied embeddings: no (`lm_head.weight` is stored)
            chat template: `tokenizer_config.json`
            edit (default options): rewrites 5 tensors (110.6 kB), copies 20 unchanged (156.9 kB)
        "#]],
    );
}

#[test]
fn json_of_the_sharded_llama() {
    let v = inspect_json(&fixture("models/llama/f32"));
    assert_eq!((&v["family"], &v["model_type"]), (&json!("llama"), &json!("llama")));
    assert_eq!(v["architectures"], json!(["LlamaForCausalLM"]));
    let c = &v["config"];
    assert_eq!(
        [&c["hidden_size"], &c["num_hidden_layers"], &c["num_attention_heads"], &c["num_key_value_heads"]],
        [&json!(64), &json!(2), &json!(4), &json!(2)]
    );
    assert_eq!((&c["head_dim"], &c["intermediate_size"], &c["vocab_size"]), (&json!(16), &json!(96), &json!(512)));
    assert_eq!((&c["tie_word_embeddings"], &c["dtype"], &c["moe"]), (&json!(true), &json!("float32"), &Value::Null));

    // f32: embedding 512x64, per layer q 64x64, k and v 32x64, o 64x64, gate and up 96x64,
    // down 64x96, two norms of 64; a final norm of 64.
    let per_layer = 4 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64 + 2 * 64);
    let total = 4 * 512 * 64 + 2 * per_layer + 4 * 64;
    let w = &v["weights"];
    assert_eq!((&w["tensors"], &w["bytes"], &w["sharded"]), (&json!(20), &json!(total), &json!(true)));
    assert_eq!(w["dtypes"], json!({"F32": {"tensors": 20, "bytes": total}}));
    let shards: Vec<(&str, u64)> = w["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["file"].as_str().unwrap(), s["tensors"].as_u64().unwrap()))
        .collect();
    assert_eq!(shards, [("model-00001-of-00002.safetensors", 5), ("model-00002-of-00002.safetensors", 15)]);
    for s in w["shards"].as_array().unwrap() {
        let len = std::fs::metadata(fixture("models/llama/f32").join(s["file"].as_str().unwrap())).unwrap().len();
        assert_eq!(s["file_bytes"], json!(len));
        assert_eq!(s["metadata"], json!({"format": "pt"}));
    }

    let writers_bytes = 4 * (512 * 64 + 2 * 64 * 64 + 2 * 64 * 96);
    let r = &v["residual_writers"];
    assert_eq!((&r["tensors"], &r["bytes"]), (&json!(5), &json!(writers_bytes)));
    let kinds: Vec<(&str, &Value, u64)> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["kind"].as_str().unwrap(), &g["layers"], g["tensors"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds, [("embedding", &json!([]), 1), ("attn_out", &json!([0, 1]), 2), ("mlp_down", &json!([0, 1]), 2)]);
    let o1 =
        r["list"].as_array().unwrap().iter().find(|t| t["name"] == "model.layers.1.self_attn.o_proj.weight").unwrap();
    assert_eq!(
        o1,
        &json!({
            "name": "model.layers.1.self_attn.o_proj.weight",
            "kind": "attn_out",
            "layer": 1,
            "expert": null,
            "bias": false,
            "model_axis": 0,
            "dtype": "F32",
            "shape": [64, 64],
            "bytes": 4 * 64 * 64,
            "file": "model-00002-of-00002.safetensors",
        })
    );
    let emb = r["list"].as_array().unwrap().iter().find(|t| t["kind"] == "embedding").unwrap();
    assert_eq!((&emb["model_axis"], &emb["layer"]), (&json!(1), &Value::Null));

    assert_eq!(v["post_norms"], json!([]));
    assert_eq!(v["other_tensors"], json!({"attn_in": 6, "final_norm": 1, "mlp_in": 4, "pre_norm": 4}));
    let t = &v["tied_embeddings"];
    assert_eq!(
        [&t["tied"], &t["config_value"], &t["lm_head_stored"], &t["default_edit"]],
        [&json!(true), &json!(true), &json!(false), &json!("untied")]
    );
    // Issue 13: one tie label in every JSON output (inspect said `untie`, the manifest `untied`).
    let tmp = tempfile::tempdir().unwrap();
    let dry = abliterate([
        "edit",
        fixture("models/llama/f32").to_str().unwrap(),
        "--direction",
        fixture("directions/llama.safetensors").to_str().unwrap(),
        "-o",
        tmp.path().join("out").to_str().unwrap(),
        "--dry-run",
        "--json",
    ]);
    let dry: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(dry["tie"], t["default_edit"]);
    assert_eq!(v["chat_template"]["present"], json!(true));
    assert_eq!(v["chat_template"]["sources"][0]["file"], json!("tokenizer_config.json"));
    assert_eq!(v["chat_template"]["sources"][0]["form"], json!("string"));

    let e = &v["edit"];
    assert_eq!((&e["tensors"], &e["bytes"]), (&json!(5), &json!(writers_bytes)));
    assert_eq!(e["by_kind"], json!({"embedding": 1, "attn_out": 2, "mlp_down": 2}));
    assert_eq!(
        e["added"],
        json!([{
            "name": "lm_head.weight",
            "copy_of": "model.embed_tokens.weight",
            "file": "model-00001-of-00002.safetensors",
            "replaces_stored": false,
            "dtype": "F32",
            "shape": [512, 64],
            "bytes": 4 * 512 * 64,
        }])
    );
    assert_eq!((&e["unchanged"], &e["unchanged_bytes"]), (&json!(15), &json!(total - writers_bytes)));
    assert_eq!(e["excluded"], json!([]));
    assert!(e["against"].as_object().unwrap().values().all(|a| a == "r"));
}

#[test]
fn json_of_gemma2_post_norms_and_fused_experts() {
    let v = inspect_json(&fixture("models/gemma2/bf16"));
    let norms: Vec<(&str, u64, &str)> = v["post_norms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["layer"].as_u64().unwrap(), n["site"].as_str().unwrap()))
        .collect();
    assert_eq!(
        norms,
        [
            ("model.layers.0.post_attention_layernorm.weight", 0, "attn"),
            ("model.layers.0.post_feedforward_layernorm.weight", 0, "mlp"),
            ("model.layers.1.post_attention_layernorm.weight", 1, "attn"),
            ("model.layers.1.post_feedforward_layernorm.weight", 1, "mlp"),
        ]
    );
    let against = &v["edit"]["against"];
    assert_eq!(against["model.layers.1.mlp.down_proj.weight"], "s(model.layers.1.post_feedforward_layernorm.weight)");
    assert_eq!(against["model.layers.0.self_attn.o_proj.weight"], "s(model.layers.0.post_attention_layernorm.weight)");
    assert_eq!(against["model.embed_tokens.weight"], "r");

    let v = inspect_json(&fixture("models/qwen3_moe_fused/bf16"));
    let fused = v["residual_writers"]["groups"].as_array().unwrap().iter().find(|g| g["fused"] == true).unwrap();
    assert_eq!(
        (&fused["kind"], &fused["fused_experts"], &fused["layers"], &fused["bytes"]),
        (&json!("expert_down"), &json!(4), &json!([0]), &json!(2 * 4 * 64 * 32))
    );
    assert_eq!(v["tied_embeddings"]["default_edit"], "not_tied");
    assert_eq!(v["config"]["moe"]["num_experts"], 4);
}

#[test]
fn every_fixture_inspects() {
    for entry in std::fs::read_dir(fixture("models")).unwrap() {
        let family = entry.unwrap().path();
        if !family.is_dir() {
            continue;
        }
        for layout in ["bf16", "f32"] {
            let dir = family.join(layout);
            if dir.is_dir() {
                let v = inspect_json(&dir);
                assert!(v["edit"]["tensors"].as_u64().unwrap() >= 5, "{}", dir.display());
                assert_eq!(v["chat_template"]["present"], true, "{}", dir.display());
            }
        }
    }
}

#[test]
fn chat_template_string_list_file_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("models/llama/bf16"), &dir);
    let tc = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    let line = |dir: &Path| inspect(dir).lines().find(|l| l.starts_with("chat template: ")).unwrap().to_string();

    config["chat_template"] =
        json!([{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "{{ tools }}"}]);
    std::fs::write(&tc, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_eq!(line(&dir), "chat template: `tokenizer_config.json` (named: default, tool_use)");
    assert_eq!(
        inspect_json(&dir)["chat_template"]["sources"],
        json!([{"file": "tokenizer_config.json", "form": "list", "names": ["default", "tool_use"]}])
    );

    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_eq!(line(&dir), "chat template: none");
    assert_eq!(inspect_json(&dir)["chat_template"]["present"], false);

    std::fs::write(dir.join("chat_template.jinja"), "{{ messages }}").unwrap();
    assert_eq!(line(&dir), "chat template: `chat_template.jinja`");

    // Issue 13: inspect reports the template `chat` uses (its discovery, not a copy of it). With a
    // file and a config template both present, that is the file only.
    config["chat_template"] = json!("{{ bos_token }}");
    std::fs::write(&tc, serde_json::to_vec(&config).unwrap()).unwrap();
    assert_eq!(line(&dir), "chat template: `chat_template.jinja`");
    let found = chat::template(&dir).unwrap().unwrap();
    assert_eq!((found.file, found.text.as_str()), ("chat_template.jinja", "{{ messages }}"));

    // A tokenizer_config.json that chat cannot read: inspect says so with chat's own message.
    std::fs::write(&tc, "{").unwrap();
    let want = chat::template(&dir).unwrap_err().to_string();
    assert_eq!(line(&dir), format!("chat template: unreadable: {}", want.replace(&dir.display().to_string(), "MODEL")));
    assert!(want.contains("tokenizer_config.json"), "{want}");
}

/// Issue 13: a tied config with a stored `lm_head.weight` is tied (the runtime and transformers 4.57
/// ignore the stored head); inspect says so and what the default edit does about it.
#[test]
fn a_stored_head_under_a_tied_config_is_reported_as_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture("models/llama/bf16"), &dir);
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let h = checkpoint::safetensors::parse(&bytes).unwrap();
    let mut entries = h.tensors.clone();
    let emb = entries.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap().clone();
    let mut data = bytes[h.data_start()..].to_vec();
    // A different head: the embedding's bytes reversed.
    let head: Vec<u8> = data[emb.begin..emb.end].iter().rev().copied().collect();
    entries.push(checkpoint::TensorEntry {
        name: "lm_head.weight".into(),
        begin: data.len(),
        end: data.len() + head.len(),
        ..emb.clone()
    });
    data.extend_from_slice(&head);
    let mut out = checkpoint::safetensors::write_header(h.metadata.as_ref(), &entries);
    out.extend_from_slice(&data);
    std::fs::write(&p, out).unwrap();
    let text = inspect(&dir);
    let tie: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("tied embeddings:")).take(3).collect();
    assert_eq!(
        tie,
        [
            "tied embeddings: yes (config.json ties them)",
            "  `lm_head.weight` is also stored but differs from the embedding: transformers 4.57 and the runtime \
             ignore it (transformers 5 would read it)",
            "  the default edit replaces it with the original embedding and sets tie_word_embeddings false \
             (docs/method.md §6)",
        ]
    );
    let v = inspect_json(&dir);
    let t = &v["tied_embeddings"];
    assert_eq!(
        [&t["tied"], &t["lm_head_stored"], &t["stored_lm_head_ignored"], &t["stored_lm_head_identical"]],
        [&json!(true), &json!(true), &json!(true), &json!(false)]
    );
    assert_eq!(v["edit"]["added"][0]["replaces_stored"], true);
    assert_eq!(v["edit"]["added_bytes"], 0);
}

/// Issue 13: help texts and reports cite `docs/method.md §N`, a file every clone has (not the
/// project's `method.md`, which users do not have); each cited section must exist there.
#[test]
fn every_cited_method_section_exists_in_docs() {
    let root = testutil::workspace_root();
    let method = std::fs::read_to_string(root.join("docs/method.md")).unwrap();
    let mut cited = 0;
    let mut stack = vec![root.join("crates"), root.join("README.md")];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, _) in text.match_indices("docs/method.md §") {
            let n: String = text[i + "docs/method.md §".len()..].chars().take_while(char::is_ascii_digit).collect();
            if n.is_empty() {
                continue; // this test's own format strings
            }
            assert!(method.contains(&format!("\n## §{n} ")), "{} cites docs/method.md §{n}", p.display());
            cited += 1;
        }
    }
    assert!(cited >= 5, "only {cited} citations found");
    // A user-visible help text never cites the project-internal `method.md` alone.
    let help = abliterate(["edit", "--help"]).stdout + &abliterate(["generate", "--help"]).stdout;
    assert_eq!(help.matches("method.md").count(), help.matches("docs/method.md").count(), "{help}");
}
