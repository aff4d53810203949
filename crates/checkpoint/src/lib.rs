//! Hugging Face checkpoints on disk, with no ML framework: `config.json`, the memory-mapped
//! safetensors shards (one `model.safetensors` or those of `model.safetensors.index.json`), and
//! the role of every tensor (method.md §6).
//!
//! Every byte read from disk is untrusted until validated: headers, offsets, shard names and the
//! index are all checked in [`Checkpoint::open`] before any tensor is handed out. This crate
//! never opens a file for writing.

pub mod config;
pub mod dtype;
pub mod roles;
pub mod safetensors;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use serde_json::{Map, Value};

pub use config::{Config, ConfigError, Family, Moe};
pub use dtype::Dtype;
pub use roles::{Reader, Role, Site, Writer, WriterKind};
pub use safetensors::{Header, HeaderError, TensorEntry};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Everything that can be wrong with a model directory. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message, so it is not also a `source()`: the CLI prints the chain
    // with `{:#}` and would repeat it (a regression found by the bad-checkpoint tests).
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("`{}` not found: MODEL must be a Hugging Face model directory with a config.json", path.display())]
    NoConfig { path: PathBuf },
    #[error("`{}`: {cause}", path.display())]
    Config { path: PathBuf, cause: ConfigError },
    #[error("`{}` has no model.safetensors or model.safetensors.index.json", dir.display())]
    NoWeights { dir: PathBuf },
    #[error(
        "`{}` has only `{file}`, a pickle file, which is never loaded (unpickling can run arbitrary code); \
         convert it to safetensors first, e.g. in Python: \
         `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`",
        dir.display()
    )]
    PickleOnly { dir: PathBuf, file: String },
    #[error("`{file}`: {problem}")]
    Header { file: String, problem: Box<HeaderError> },
    #[error("`{INDEX_FILE}`: {problem}")]
    Index { problem: String },
    #[error("tensor `{name}` is in both `{first}` and `{second}`")]
    DuplicateTensor { name: String, first: String, second: String },
    #[error("tensor `{name}` in `{file}`: {problem}")]
    Tensor { name: String, file: String, problem: String },
    #[error("{} unknown tensor{} in `{file}`: {}; abliterate does not know whether {} to the residual stream. Exclude {} explicitly with --exclude if it is safe to leave unedited",
        names.len(), if names.len() == 1 { "" } else { "s" },
        names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
        if names.len() == 1 { "it writes" } else { "they write" },
        if names.len() == 1 { "it" } else { "them" })]
    UnknownTensors { names: Vec<String>, file: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the LM head reads ([`Checkpoint::head`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// config.json unties them: the stored `lm_head.weight`.
    Stored,
    /// config.json ties them and no `lm_head.weight` is stored: the embedding.
    Tied,
    /// config.json ties them, yet an `lm_head.weight` is stored: the head is the embedding and the
    /// stored tensor is ignored. `identical`: it has the embedding's dtype, shape and bytes.
    TiedIgnoringStored { identical: bool },
}

impl Head {
    /// Whether the head reads the embedding.
    pub fn tied(self) -> bool {
        self != Head::Stored
    }
}

/// One memory-mapped, validated safetensors file.
pub struct Shard {
    /// File name inside the model directory.
    pub file_name: String,
    pub path: PathBuf,
    pub header: Header,
    mmap: Mmap,
}

impl Shard {
    /// Opens and validates one safetensors file.
    pub fn open(path: &Path, file_name: &str) -> Result<Shard> {
        let io = |cause| Error::Io { path: path.to_path_buf(), cause };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let herr = |problem| Error::Header { file: file_name.to_string(), problem: Box::new(problem) };
        // Read the length prefix before mapping so that a hostile length fails cleanly.
        let mut prefix = [0u8; 8];
        let got = (&file).take(8).read(&mut prefix).map_err(io)?;
        let json_len = safetensors::header_len(&prefix[..got], len).map_err(herr)?;
        // SAFETY: the map is read-only; a concurrent writer of the input file would be a user
        // error we cannot prevent, and we never write through it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        if (mmap.len() as u64) < len {
            return Err(herr(HeaderError::TooShort { len: mmap.len() as u64 }));
        }
        let header = safetensors::parse_json(&mmap[8..8 + json_len]).map_err(herr)?;
        safetensors::validate_layout(&header, mmap.len() - 8 - json_len).map_err(herr)?;
        Ok(Shard { file_name: file_name.to_string(), path: path.to_path_buf(), header, mmap })
    }

    /// The whole file, header included.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The stored bytes of a tensor of this shard.
    pub fn tensor_bytes(&self, t: &TensorEntry) -> &[u8] {
        let start = self.header.data_start();
        &self.mmap[start + t.begin..start + t.end]
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Tells the kernel this process is done, for now, with bytes `range` of the file, so that a
    /// reader streaming through the maps (e.g. `diff`) keeps a resident set that does not grow
    /// with the checkpoint. The pages stay in the page cache; reading them again maps them again.
    pub fn release(&self, range: std::ops::Range<usize>) {
        if range.start >= range.end || range.end > self.mmap.len() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the map is read-only and shared with the file, never written through: dropping
        // pages only unmaps them from this process, and any later read (by any thread) faults the
        // same file contents back in. A failure only means the pages stay resident.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// `__metadata__` of the file, if any.
    pub fn metadata(&self) -> Option<&Map<String, Value>> {
        self.header.metadata.as_ref()
    }
}

/// Where a tensor lives: shard index and entry index in that shard's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub shard: usize,
    pub entry: usize,
}

/// A model directory, opened and validated.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    /// Shards in the order of their file names.
    pub shards: Vec<Shard>,
    /// The index file as read, if the checkpoint is sharded.
    pub index: Option<Map<String, Value>>,
    by_name: HashMap<String, TensorRef>,
}

impl Checkpoint {
    /// Opens a model directory: config.json, then every shard, validating all of it.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        let text = match std::fs::read(&config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoConfig { path: config_path });
            }
            Err(cause) => {
                return Err(Error::Io { path: config_path, cause });
            }
        };
        let config = Config::parse(&text).map_err(|cause| Error::Config { path: config_path, cause })?;

        let (file_names, index) = if dir.join(SINGLE_FILE).is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else if dir.join(INDEX_FILE).is_file() {
            let (names, index) = read_index(dir)?;
            (names, Some(index))
        } else {
            for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
                if dir.join(pickle).exists() {
                    return Err(Error::PickleOnly { dir: dir.to_path_buf(), file: pickle.to_string() });
                }
            }
            return Err(Error::NoWeights { dir: dir.to_path_buf() });
        };

        let mut shards = Vec::with_capacity(file_names.len());
        let mut by_name: HashMap<String, TensorRef> = HashMap::new();
        for (si, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::Index {
                    problem: format!("names shard `{name}`, which does not exist in `{}`", dir.display()),
                });
            }
            let shard = Shard::open(&path, name)?;
            for (ei, t) in shard.header.tensors.iter().enumerate() {
                if let Some(prev) = by_name.insert(t.name.clone(), TensorRef { shard: si, entry: ei }) {
                    return Err(Error::DuplicateTensor {
                        name: t.name.clone(),
                        first: file_names[prev.shard].clone(),
                        second: name.clone(),
                    });
                }
            }
            shards.push(shard);
        }
        let ckpt = Checkpoint { dir: dir.to_path_buf(), config, shards, index, by_name };
        ckpt.check_index()?;
        Ok(ckpt)
    }

    /// Every index entry must be in the shard the index names.
    fn check_index(&self) -> Result<()> {
        let Some(index) = &self.index else {
            return Ok(());
        };
        let map = index.get("weight_map").and_then(Value::as_object).expect("read_index checked weight_map");
        for (tensor, file) in map {
            let file = file.as_str().expect("read_index checked the values");
            match self.by_name.get(tensor) {
                Some(r) if self.shards[r.shard].file_name == file => {}
                Some(r) => {
                    return Err(Error::Index {
                        problem: format!(
                            "puts tensor `{tensor}` in `{file}`, but it is in `{}`",
                            self.shards[r.shard].file_name
                        ),
                    });
                }
                None => {
                    return Err(Error::Index { problem: format!("tensor `{tensor}` is not in its shard `{file}`") });
                }
            }
        }
        Ok(())
    }

    /// All tensors, shard by shard in file order, each in header order.
    pub fn tensors(&self) -> impl Iterator<Item = (TensorRef, &TensorEntry)> {
        self.shards.iter().enumerate().flat_map(|(si, s)| {
            s.header.tensors.iter().enumerate().map(move |(ei, t)| (TensorRef { shard: si, entry: ei }, t))
        })
    }

    pub fn get(&self, name: &str) -> Option<(TensorRef, &TensorEntry)> {
        let r = *self.by_name.get(name)?;
        Some((r, self.entry(r)))
    }

    pub fn entry(&self, r: TensorRef) -> &TensorEntry {
        &self.shards[r.shard].header.tensors[r.entry]
    }

    /// Stored bytes of a tensor.
    pub fn bytes(&self, r: TensorRef) -> &[u8] {
        let s = &self.shards[r.shard];
        s.tensor_bytes(&s.header.tensors[r.entry])
    }

    /// Releases the mapped pages of a tensor (see [`Shard::release`]).
    pub fn release(&self, r: TensorRef) {
        let s = &self.shards[r.shard];
        let t = &s.header.tensors[r.entry];
        let start = s.header.data_start();
        s.release(start + t.begin..start + t.end);
    }

    /// The shard file name a tensor lives in.
    pub fn file_of(&self, r: TensorRef) -> &str {
        &self.shards[r.shard].file_name
    }

    /// Decodes a float tensor to f32 (exact for bf16/f16/f32).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (r, t) = self.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            file: self.shards.first().map(|s| s.file_name.clone()).unwrap_or_default(),
            problem: "not found in the checkpoint".into(),
        })?;
        if !t.dtype.is_float() {
            return Err(self.tensor_error(r, format!("dtype {} is not a float type", t.dtype)));
        }
        let mut out = vec![0f32; t.numel()];
        dtype::decode_f32(t.dtype, self.bytes(r), &mut out);
        Ok(out)
    }

    pub fn tensor_error(&self, r: TensorRef, problem: String) -> Error {
        Error::Tensor { name: self.entry(r).name.clone(), file: self.file_of(r).to_string(), problem }
    }

    /// The role of a tensor in this checkpoint's family.
    pub fn role(&self, r: TensorRef) -> Role {
        let t = self.entry(r);
        roles::classify(self.config.family, &t.name, t.shape.len())
    }

    /// What the LM head reads: the one tie rule, used by `edit` and by the runtime.
    ///
    /// transformers (4.57, every supported family alike: `tie_weights` after loading) ties the head
    /// to the embedding whenever config.json says `tie_word_embeddings` (the family default
    /// where it is absent, [`Family::default_tie`]); a stored `lm_head.weight` is then ignored.
    /// Whether it was a harmless copy (as `.bin` conversions store) matters for what an edit
    /// writes: transformers 5 ties only when the two are equal and otherwise reads the stored
    /// head, so a differing one makes the input mean different models to different loaders.
    pub fn head(&self) -> Head {
        let stored = self.lm_head_name();
        match (self.config.tie_word_embeddings, stored) {
            (false, _) => Head::Stored,
            (true, None) => Head::Tied,
            (true, Some(head)) => {
                let same = |(h, e): (TensorRef, TensorRef)| {
                    let (ht, et) = (self.entry(h), self.entry(e));
                    ht.dtype == et.dtype && ht.shape == et.shape && self.bytes(h) == self.bytes(e)
                };
                let pair =
                    self.get(head).map(|(h, _)| h).zip(self.embedding_name().and_then(|e| self.get(e)).map(|(e, _)| e));
                Head::TiedIgnoringStored { identical: pair.is_some_and(same) }
            }
        }
    }

    /// Whether the LM head reads the embedding ([`Checkpoint::head`]): exactly when config.json
    /// (or the family default) says `tie_word_embeddings`.
    pub fn tied(&self) -> bool {
        self.config.tie_word_embeddings
    }

    pub fn has_lm_head(&self) -> bool {
        self.lm_head_name().is_some()
    }

    /// The stored name of the LM head, if one is stored.
    pub fn lm_head_name(&self) -> Option<&str> {
        ["lm_head.weight", "language_model.lm_head.weight"].into_iter().find(|n| self.get(n).is_some())
    }

    /// The gain-weighted unit direction of a Gemma 2/3 post-norm (method.md §6): with the gain
    /// `g = 1 + w` of the RMSNorm weight `norm`, decoded exactly to f64, `ŝ = (g ⊙ r̂)/||g ⊙ r̂||`.
    /// `ŝᵀu = 0` is exactly "the block writing `u` through this norm adds nothing along `r̂`"
    /// (`r̂ᵀ(g ⊙ u) = ||g ⊙ r̂|| ŝᵀu`), so `edit` removes `ŝ` and `diff` measures it. Where
    /// `g ⊙ r̂ = 0` the block cannot write along `r̂` at all and `ŝ` is returned as zeros.
    pub fn gain_weighted_unit(&self, norm: TensorRef, r_hat: &[f64]) -> Result<Vec<f64>> {
        let t = self.entry(norm);
        let d = r_hat.len();
        if t.shape != [d] || !t.dtype.is_float() {
            return Err(self.tensor_error(
                norm,
                format!("a post-norm gain must be a float vector of hidden_size {d}, found {} {:?}", t.dtype, t.shape),
            ));
        }
        let mut w = vec![0f64; d];
        dtype::decode_f64(t.dtype, self.bytes(norm), &mut w);
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(self.tensor_error(norm, format!("post-norm gain is not finite at index {i}")));
        }
        let s: Vec<f64> = w.iter().zip(r_hat).map(|(w, r)| (1.0 + w) * r).collect();
        let n = s.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n == 0.0 {
            return Ok(vec![0.0; d]);
        }
        Ok(s.iter().map(|v| v / n).collect())
    }

    /// The stored name of the token embedding.
    pub fn embedding_name(&self) -> Option<&str> {
        self.tensors()
            .find(|(r, _)| matches!(self.role(*r), Role::Writer(Writer { kind: WriterKind::Embedding, .. })))
            .map(|(_, t)| t.name.as_str())
    }

    /// Checks that every tensor is known (unless `excluded`) and that every writer has a float
    /// dtype and the shape config.json implies. Returns the roles in [`Checkpoint::tensors`] order.
    pub fn check_roles(&self, excluded: impl Fn(&str) -> bool) -> Result<Vec<Role>> {
        let mut unknown: Vec<(usize, String)> = Vec::new();
        let mut roles = Vec::new();
        for (r, t) in self.tensors() {
            let role = self.role(r);
            if let Role::Writer(w) = &role
                && !excluded(&t.name)
            {
                self.check_writer(r, w)?;
            }
            if role == Role::Unknown && !excluded(&t.name) {
                unknown.push((r.shard, t.name.clone()));
            }
            roles.push(role);
        }
        if let Some((shard, _)) = unknown.first() {
            let shard = *shard;
            let names = unknown.iter().filter(|(s, _)| *s == shard).map(|(_, n)| n.clone()).collect();
            return Err(Error::UnknownTensors { names, file: self.shards[shard].file_name.clone() });
        }
        if !self.config.tie_word_embeddings && !self.has_lm_head() {
            return Err(Error::Config {
                path: self.dir.join("config.json"),
                cause: ConfigError::BadField {
                    field: "tie_word_embeddings (false, but no lm_head.weight is stored)".into(),
                },
            });
        }
        Ok(roles)
    }

    fn check_writer(&self, r: TensorRef, w: &Writer) -> Result<()> {
        let t = self.entry(r);
        if !t.dtype.is_float() {
            return Err(self.tensor_error(
                r,
                format!(
                    "dtype {} is not supported for a residual writer (BF16, F16, F32 and F64 are); \
                     quantized checkpoints must be dequantized first",
                    t.dtype
                ),
            ));
        }
        let want = roles::expected_shape(&self.config, w);
        let fits = want.len() == t.shape.len() && want.iter().zip(&t.shape).all(|(w, &s)| w.is_none_or(|w| w == s));
        if !fits {
            return Err(self.tensor_error(
                r,
                format!("shape {:?} contradicts config.json ({})", t.shape, roles::shape_fields(&self.config, w)),
            ));
        }
        Ok(())
    }

    /// Files of the model directory other than the weights and the index, relative to `dir`,
    /// sorted (what an edited copy must carry over unchanged).
    pub fn other_files(&self) -> Result<Vec<PathBuf>> {
        let weights: std::collections::HashSet<&str> = self.shards.iter().map(|s| s.file_name.as_str()).collect();
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = self.dir.join(&rel);
            let rd = std::fs::read_dir(&abs).map_err(|cause| Error::Io { path: abs.clone(), cause })?;
            for entry in rd {
                let entry = entry.map_err(|cause| Error::Io { path: abs.clone(), cause })?;
                let rel_child = rel.join(entry.file_name());
                // Follow symlinks (a Hugging Face cache snapshot is all symlinks).
                let meta = std::fs::metadata(entry.path()).map_err(|cause| Error::Io { path: entry.path(), cause })?;
                if meta.is_dir() {
                    stack.push(rel_child);
                } else if meta.is_file() {
                    let top = rel.as_os_str().is_empty();
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if top && (weights.contains(name.as_ref()) || (self.index.is_some() && name == INDEX_FILE)) {
                        continue;
                    }
                    out.push(rel_child);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Reads and checks `model.safetensors.index.json`; returns the shard file names (sorted, unique).
fn read_index(dir: &Path) -> Result<(Vec<String>, Map<String, Value>)> {
    let path = dir.join(INDEX_FILE);
    let text = std::fs::read(&path).map_err(|cause| Error::Io { path: path.clone(), cause })?;
    parse_index(&text)
}

/// Parses and checks the text of `model.safetensors.index.json` (untrusted: never panics, a fuzz
/// target holds us to it): a JSON object whose `weight_map` maps tensor names to shard file names
/// that stay inside the model directory. Returns the shard names (sorted, unique) and the object.
pub fn parse_index(text: &[u8]) -> Result<(Vec<String>, Map<String, Value>)> {
    let bad = |problem: String| Error::Index { problem };
    let value: Value = serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Object(index) = value else {
        return Err(bad("not a JSON object".into()));
    };
    let map = index.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("shard of tensor `{tensor}` is not a string")))?;
        check_shard_name(file).map_err(|why| bad(format!("shard name `{file}` {why}")))?;
        names.push(file.to_string());
    }
    if names.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    names.sort();
    names.dedup();
    Ok((names, index))
}

/// A shard must be a plain file name inside the model directory.
fn check_shard_name(name: &str) -> Result<(), &'static str> {
    let p = Path::new(name);
    if p.is_absolute() || name.starts_with('/') || name.starts_with('\\') {
        return Err("is an absolute path; shards must be files inside the model directory");
    }
    let mut comps = p.components();
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(_)), None) if !name.contains('\\') && !name.contains('/') => Ok(()),
        _ if p.components().any(|c| matches!(c, Component::ParentDir)) || name.contains("..") => {
            Err("leaves the model directory; shards must be files inside it")
        }
        _ => Err("is not a plain file name; shards must be files directly inside the model directory"),
    }
}
