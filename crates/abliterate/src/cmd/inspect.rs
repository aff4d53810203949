//! `abliterate inspect MODEL [--json]`: what a checkpoint holds (family, dimensions, dtypes,
//! shards), which tensors write to the residual stream, how tied embeddings and post-norms are
//! handled, whether there is a chat template, and what `abliterate edit` would rewrite
//! (`edit::plan` with the default options). Opening the model validates all of it, so a broken
//! checkpoint fails here with the same message as in `edit`; unknown tensors are listed instead,
//! with what `edit` does about them.
//!
//! Reads headers and config only: no tensor data is decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use checkpoint::{Checkpoint, Head, Role, Site, TensorRef, WriterKind};
use edit::{Options, Plan, Tie, human_bytes};
use serde_json::{Map, Value, json};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: a Hugging Face checkpoint (config.json and safetensors weights).
    model: PathBuf,
    /// Accept tensors matching this glob as edit does (repeatable): an unknown tensor that matches
    /// is no longer an error, and the plan leaves matching tensors unedited.
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Print everything as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let ckpt = Checkpoint::open(&args.model)?;
    // Unknown tensors are listed, not fatal: the plan shown is the edit with them excluded, and
    // the report says that `edit` refuses them until the user excludes them.
    let mut options = Options { exclude: args.exclude.clone(), ..Options::default() };
    let unknown = edit::unknown_tensors(&ckpt, &options)?;
    options.exclude.extend(unknown.iter().map(|&r| edit::exact_pattern(&ckpt.entry(r).name)));
    let plan = edit::plan(&ckpt, &options)?;
    let mut info = Info::gather(&ckpt, &plan);
    info.unknown = unknown;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info.json(&args.model, &ckpt, &plan))?);
    } else {
        print!("{}", info.human(&args.model, &ckpt, &plan));
    }
    Ok(ExitCode::SUCCESS)
}

/// Writers of one kind, grouped for a compact line.
#[derive(Default)]
struct Group {
    /// Tensors per layer (None: the embedding).
    layers: BTreeMap<Option<usize>, usize>,
    tensors: usize,
    bytes: u64,
    dtypes: BTreeSet<String>,
    /// Experts per fused tensor, for fused 3-D expert tensors.
    fused_experts: Option<usize>,
    /// Name and shape, when the group is one tensor (the embedding).
    single: Option<(String, Vec<usize>)>,
}

struct Info {
    /// (label, fused) -> group, in kind order.
    writers: Vec<((String, bool), Group)>,
    /// Reader labels and counts (and post-norms, unknown excluded tensors).
    others: BTreeMap<String, usize>,
    post_norms: Vec<(String, usize, Site)>,
    dtypes: BTreeMap<String, (usize, u64)>,
    template: Template,
    /// Tensors `edit` refuses (unknown, not excluded).
    unknown: Vec<TensorRef>,
}

/// Where the chat template is, as `chat` finds it (`chat::template`).
struct Template {
    sources: Vec<Value>,
    /// Why `chat` cannot read it (e.g. tokenizer_config.json is not JSON).
    notes: Vec<String>,
}

impl Info {
    fn gather(ckpt: &Checkpoint, _plan: &Plan) -> Info {
        let mut groups: BTreeMap<(usize, String, bool), Group> = BTreeMap::new();
        let mut others = BTreeMap::new();
        let mut post_norms = Vec::new();
        let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        for (r, t) in ckpt.tensors() {
            let d = dtypes.entry(t.dtype.as_str().to_string()).or_default();
            d.0 += 1;
            d.1 += t.nbytes() as u64;
            match ckpt.role(r) {
                Role::Writer(w) => {
                    let fused = w.kind == WriterKind::ExpertDown && w.expert.is_none() && t.shape.len() == 3;
                    let order = WriterKind::ALL.iter().position(|k| *k == w.kind).unwrap_or(0) * 2 + w.bias as usize;
                    let g = groups.entry((order, w.label(), fused)).or_default();
                    *g.layers.entry(w.layer).or_default() += 1;
                    g.tensors += 1;
                    g.bytes += t.nbytes() as u64;
                    g.dtypes.insert(t.dtype.as_str().to_string());
                    if fused {
                        g.fused_experts = Some(t.shape[0]);
                    }
                    g.single = (g.tensors == 1).then(|| (t.name.clone(), t.shape.clone()));
                }
                Role::PostNorm { layer, site } => post_norms.push((t.name.clone(), layer, site)),
                role => *others.entry(role.label()).or_default() += 1,
            }
        }
        let writers = groups.into_iter().map(|((_, label, fused), g)| ((label, fused), g)).collect();
        Info { writers, others, post_norms, dtypes, template: Template::find(&ckpt.dir), unknown: Vec::new() }
    }

    fn human(&self, model: &Path, ckpt: &Checkpoint, plan: &Plan) -> String {
        let c = &ckpt.config;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let arch = c.file.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
        line(format!("{}: {}{}", model.display(), c.model_type, arch.map(|a| format!(" ({a})")).unwrap_or_default()));
        let mut dims = format!(
            "  {}, hidden {}, {} heads ({} kv, head_dim {})",
            count(c.num_hidden_layers, "layer"),
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        );
        if let Some(i) = c.intermediate_size.filter(|_| c.family != checkpoint::Family::Mixtral) {
            dims.push_str(&format!(", mlp {i}"));
        }
        if let Some(m) = &c.moe {
            dims.push_str(&format!(
                ", {} experts (top {}, width {}{})",
                m.num_experts,
                m.experts_per_token,
                m.expert_intermediate_size,
                m.shared_expert_intermediate_size.map(|s| format!(", shared expert {s}")).unwrap_or_default()
            ));
        }
        dims.push_str(&format!(", vocab {}", c.vocab_size));
        line(dims);

        let total: u64 = self.dtypes.values().map(|(_, b)| b).sum();
        let n: usize = self.dtypes.values().map(|(n, _)| n).sum();
        let dtypes = if self.dtypes.len() == 1 {
            self.dtypes.keys().next().expect("one").to_lowercase()
        } else {
            self.dtypes.iter().map(|(d, (n, _))| format!("{} ({n})", d.to_lowercase())).collect::<Vec<_>>().join(", ")
        };
        let torch = c.dtype.as_ref().map(|d| format!("; config dtype {d}")).unwrap_or_default();
        if ckpt.shards.len() == 1 {
            line(format!(
                "weights: {} in `{}`, {}, {dtypes}{torch}",
                human_bytes(total),
                ckpt.shards[0].file_name,
                count(n, "tensor")
            ));
        } else {
            line(format!(
                "weights: {} in {} shards, {}, {dtypes}{torch}",
                human_bytes(total),
                ckpt.shards.len(),
                count(n, "tensor")
            ));
            const SHOWN: usize = 8;
            for s in ckpt.shards.iter().take(SHOWN) {
                line(format!(
                    "  {}  {}  {}",
                    s.file_name,
                    human_bytes(s.len()),
                    count(s.header.tensors.len(), "tensor")
                ));
            }
            if ckpt.shards.len() > SHOWN {
                line(format!("  ... and {} more (--json lists all)", ckpt.shards.len() - SHOWN));
            }
        }

        let (wn, wb) = self.writers.iter().fold((0, 0), |(n, b), (_, g)| (n + g.tensors, b + g.bytes));
        line(format!("residual writers: {}, {}", count(wn, "tensor"), human_bytes(wb)));
        for ((label, fused), g) in &self.writers {
            line(format!("  {label}: {}", group_text(*fused, g)));
        }
        if !self.post_norms.is_empty() {
            let layers: BTreeSet<usize> = self.post_norms.iter().map(|(_, l, _)| *l).collect();
            line(format!(
                "post-norms: {} ({}) scale each block's write by g = 1 + w",
                layer_text(&layers.into_iter().collect::<Vec<_>>()),
                count(self.post_norms.len(), "tensor")
            ));
            line("  so the edit removes ŝ = (g ⊙ r̂)/|g ⊙ r̂| of each layer from its writers (docs/method.md §6)".into());
        }
        if !self.others.is_empty() {
            let n: usize = self.others.values().sum();
            let parts: Vec<String> = self.others.iter().map(|(k, n)| format!("{k} {n}")).collect();
            line(format!("other tensors: {n} ({})", parts.join(", ")));
        }
        if !self.unknown.is_empty() {
            line(format!(
                "unknown tensors: {}; edit refuses them: abliterate does not know whether they write to the \
                 residual stream",
                self.unknown.len()
            ));
            for &r in &self.unknown {
                let t = ckpt.entry(r);
                line(format!("  `{}` {:?} {} in `{}`", t.name, t.shape, t.dtype, ckpt.file_of(r)));
            }
            line(
                "  pass --exclude NAME (or a glob) for each one you know does not write to it: edit then copies it \
                 unchanged"
                    .into(),
            );
        }
        let tie = tie_text(ckpt, plan);
        let mut tie = tie.split("; ");
        line(format!("tied embeddings: {}", tie.next().unwrap_or_default()));
        tie.for_each(|rest| line(format!("  {rest}")));
        line(format!("chat template: {}", self.template.text()));
        let refused = match self.unknown.len() {
            0 => String::new(),
            1 => "refuses the unknown tensor; with it excluded, ".into(),
            n => format!("refuses the {n} unknown tensors; with them excluded, "),
        };
        let mut edit = format!(
            "edit (default options): {refused}rewrites {} ({})",
            count(plan.edits.len(), "tensor"),
            human_bytes(plan.edit_bytes())
        );
        for a in &plan.added {
            edit.push_str(&format!(", adds `{}` ({})", a.name, human_bytes(a.bytes)));
        }
        edit.push_str(&format!(", copies {} unchanged ({})", plan.unchanged, human_bytes(plan.unchanged_bytes)));
        line(edit);
        for e in plan.excluded.iter().filter(|e| !self.is_unknown(ckpt, &e.name)) {
            line(format!("  excluded: `{}` ({})", e.name, e.reason));
        }
        out
    }

    fn is_unknown(&self, ckpt: &Checkpoint, name: &str) -> bool {
        self.unknown.iter().any(|&r| ckpt.entry(r).name == name)
    }

    fn json(&self, model: &Path, ckpt: &Checkpoint, plan: &Plan) -> Value {
        let c = &ckpt.config;
        let total: u64 = self.dtypes.values().map(|(_, b)| b).sum();
        let writers: Vec<Value> = ckpt
            .tensors()
            .filter_map(|(r, t)| {
                let Role::Writer(w) = ckpt.role(r) else { return None };
                Some(json!({
                    "name": t.name,
                    "kind": w.label(),
                    "layer": w.layer,
                    "expert": w.expert,
                    "bias": w.bias,
                    "model_axis": w.model_axis,
                    "dtype": t.dtype.as_str(),
                    "shape": t.shape,
                    "bytes": t.nbytes(),
                    "file": ckpt.file_of(r),
                }))
            })
            .collect();
        let groups: Vec<Value> = self
            .writers
            .iter()
            .map(|((label, fused), g)| {
                json!({
                    "kind": label,
                    "fused_experts": g.fused_experts,
                    "layers": g.layers.keys().flatten().collect::<Vec<_>>(),
                    "tensors_per_layer": g.layers.iter().filter_map(|(l, n)| l.map(|l| (l.to_string(), json!(n)))).collect::<Map<_, _>>(),
                    "tensors": g.tensors,
                    "bytes": g.bytes,
                    "dtypes": g.dtypes,
                    "fused": fused,
                })
            })
            .collect();
        let moe = c.moe.as_ref().map(|m| {
            json!({
                "num_experts": m.num_experts,
                "experts_per_token": m.experts_per_token,
                "expert_intermediate_size": m.expert_intermediate_size,
                "shared_expert_intermediate_size": m.shared_expert_intermediate_size,
            })
        });
        let (wn, wb) = self.writers.iter().fold((0, 0), |(n, b), (_, g)| (n + g.tensors, b + g.bytes));
        json!({
            "model": model.display().to_string(),
            "model_type": c.model_type,
            "family": c.family.name(),
            "architectures": c.file.get("architectures").cloned().unwrap_or(Value::Null),
            "config": {
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "head_dim": c.head_dim,
                "intermediate_size": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "moe": moe,
                "tie_word_embeddings": c.tie_word_embeddings,
                "dtype": c.dtype,
            },
            "weights": {
                "tensors": self.dtypes.values().map(|(n, _)| n).sum::<usize>(),
                "bytes": total,
                "sharded": ckpt.index.is_some(),
                "dtypes": self.dtypes.iter().map(|(d, (n, b))| (d.clone(), json!({"tensors": n, "bytes": b}))).collect::<Map<_, _>>(),
                "shards": ckpt.shards.iter().map(|s| json!({
                    "file": s.file_name,
                    "file_bytes": s.len(),
                    "tensors": s.header.tensors.len(),
                    "metadata": s.metadata(),
                })).collect::<Vec<_>>(),
            },
            "residual_writers": {
                "tensors": wn,
                "bytes": wb,
                "groups": groups,
                "list": writers,
            },
            "post_norms": self.post_norms.iter().map(|(name, layer, site)| json!({
                "name": name,
                "layer": layer,
                "site": match site { Site::Attn => "attn", Site::Mlp => "mlp" },
            })).collect::<Vec<_>>(),
            "other_tensors": self.others,
            "unknown_tensors": self.unknown.iter().map(|&r| {
                let t = ckpt.entry(r);
                json!({"name": t.name, "file": ckpt.file_of(r), "dtype": t.dtype.as_str(), "shape": t.shape})
            }).collect::<Vec<_>>(),
            "tied_embeddings": {
                "tied": ckpt.tied(),
                "config_value": c.tie_word_embeddings,
                "lm_head_stored": ckpt.has_lm_head(),
                "stored_lm_head_ignored": matches!(plan.head, Head::TiedIgnoringStored { .. }),
                "stored_lm_head_identical": matches!(plan.head, Head::TiedIgnoringStored { identical: true }),
                "default_edit": plan.tie.label(),
                "explanation": tie_text(ckpt, plan),
            },
            "chat_template": {
                "present": !self.template.sources.is_empty(),
                "sources": self.template.sources,
                "notes": self.template.notes,
            },
            "edit": {
                "options": "default",
                "tensors": plan.edits.len(),
                "bytes": plan.edit_bytes(),
                "by_kind": plan.counts_by_kind().into_iter().map(|(k, n)| (k, json!(n))).collect::<Map<_, _>>(),
                "against": plan.edits.iter().map(|e| (e.name.clone(), json!(e.against.label()))).collect::<Map<_, _>>(),
                "added": plan.added.iter().map(|a| json!({
                    "name": a.name,
                    "copy_of": a.copy_of,
                    "file": a.file,
                    "replaces_stored": a.replaces.is_some(),
                    "dtype": a.dtype.as_str(),
                    "shape": a.shape,
                    "bytes": a.bytes,
                })).collect::<Vec<_>>(),
                "added_bytes": plan.added_bytes(),
                "refused_unknown": self.unknown.len(),
                "excluded": plan.excluded.iter().filter(|e| !self.is_unknown(ckpt, &e.name)).map(|e| json!({"name": e.name, "reason": e.reason.to_string()})).collect::<Vec<_>>(),
                "unchanged": plan.unchanged,
                "unchanged_bytes": plan.unchanged_bytes,
            },
        })
    }
}

/// `layers 0-29 (30 tensors, 19.9 MB, bf16)`, or for the embedding its name and shape.
fn group_text(fused: bool, g: &Group) -> String {
    let dtypes = g.dtypes.iter().map(|d| d.to_lowercase()).collect::<Vec<_>>().join("/");
    let layers: Vec<usize> = g.layers.keys().flatten().copied().collect();
    if layers.is_empty() {
        if let (1, Some((name, shape))) = (g.tensors, &g.single) {
            return format!("`{name}` {shape:?} ({}, {dtypes})", human_bytes(g.bytes));
        }
        return format!("{} ({}, {dtypes})", count(g.tensors, "tensor"), human_bytes(g.bytes));
    }
    let per_layer: BTreeSet<usize> = g.layers.values().copied().collect();
    let mut what = layer_text(&layers);
    if fused {
        what.push_str(&format!(", fused [{} experts, d, ff]", g.fused_experts.unwrap_or(0)));
    } else if per_layer.iter().any(|&n| n > 1) {
        let (lo, hi) = (per_layer.first().expect("non-empty"), per_layer.last().expect("non-empty"));
        what.push_str(&if lo == hi {
            format!(", {lo} experts per layer")
        } else {
            format!(", {lo}-{hi} experts per layer")
        });
    }
    format!("{what} ({}, {}, {dtypes})", count(g.tensors, "tensor"), human_bytes(g.bytes))
}

/// `1 tensor`, `2 tensors`.
fn count(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// `layer 3`, `layers 0-29`, `layers 0-3, 5, 7-9`.
fn layer_text(layers: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        let mut end = start;
        while i + 1 < layers.len() && layers[i + 1] == end + 1 {
            i += 1;
            end = layers[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    let s = if layers.len() == 1 { "" } else { "s" };
    format!("layer{s} {}", parts.join(", "))
}

fn tie_text(ckpt: &Checkpoint, plan: &Plan) -> String {
    let head = ckpt.lm_head_name().unwrap_or("lm_head.weight");
    match (plan.tie, plan.head) {
        (Tie::NotTied, _) => format!("no (`{head}` is stored)"),
        (_, Head::TiedIgnoringStored { identical }) => {
            let stored = if identical {
                format!("`{head}` is also stored, an identical copy of the embedding")
            } else {
                format!(
                    "`{head}` is also stored but differs from the embedding: transformers 4.57 and the runtime \
                     ignore it (transformers 5 would read it)"
                )
            };
            let edit = match plan.tie {
                Tie::Untie if identical => "the default edit keeps it as the original embedding and sets \
                                            tie_word_embeddings false (docs/method.md §6)"
                    .to_string(),
                Tie::Untie => "the default edit replaces it with the original embedding and sets tie_word_embeddings \
                               false (docs/method.md §6)"
                    .to_string(),
                _ => "the embedding is not edited, so the tie stays".to_string(),
            };
            format!("yes (config.json ties them); {stored}; {edit}")
        }
        (Tie::Untie, _) => {
            let a = plan.added.first().expect("untie adds the LM head");
            format!(
                "yes (no `{}` stored); the default edit unties them (docs/method.md §6): it adds `{}` = the original \
                 embedding and sets tie_word_embeddings false; --keep-tie keeps the tie and also edits the unembedding",
                a.name, a.name,
            )
        }
        (Tie::KeepTie, _) => "yes, kept: the edit also changes the unembedding".to_string(),
        (Tie::TiedUnedited, _) => "yes; the embedding is not edited, so the tie stays".to_string(),
    }
}

impl Template {
    /// The template `generate` (and every command that chats) would use: `chat::template`.
    fn find(dir: &Path) -> Template {
        match chat::template(dir) {
            Ok(Some(t)) if t.names.is_empty() => Template {
                sources: vec![
                    json!({"file": t.file, "form": if t.file == "chat_template.jinja" { "file" } else { "string" }, "chars": t.text.chars().count()}),
                ],
                notes: Vec::new(),
            },
            Ok(Some(t)) => {
                Template { sources: vec![json!({"file": t.file, "form": "list", "names": t.names})], notes: Vec::new() }
            }
            Ok(None) => Template { sources: Vec::new(), notes: Vec::new() },
            Err(e) => Template { sources: Vec::new(), notes: vec![format!("unreadable: {e}")] },
        }
    }

    fn text(&self) -> String {
        let mut parts: Vec<String> = self
            .sources
            .iter()
            .map(|s| {
                let file = s["file"].as_str().unwrap_or_default();
                match s["form"].as_str() {
                    Some("list") => {
                        let names: Vec<&str> =
                            s["names"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                        format!("`{file}` (named: {})", names.join(", "))
                    }
                    _ => format!("`{file}`"),
                }
            })
            .collect();
        if parts.is_empty() && self.notes.is_empty() {
            parts.push("none".into());
        }
        parts.extend(self.notes.iter().cloned());
        parts.join("; ")
    }
}
