//! What an edit rewrites, decided from names, roles and options alone: no tensor data is read
//! (except the small post-norm gains in [`Plan::units`]), nothing is computed or written.
//!
//! `inspect` shows a plan; `edit --dry-run` prints one; `write` carries one out. A plan names,
//! for every rewritten tensor, the direction it is orthogonalized against and the scale, so that
//! per-layer directions or per-kind scales only change the plan, never the kernel or the writer.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use checkpoint::{Checkpoint, Dtype, Family, Head, Role, Site, TensorRef, Writer, WriterKind};

use direction::{Basis, Directions};

use crate::layer_kernel::LayerKernel;
use crate::{Error, Result};

/// What the user asked for. `Default` is the paper's edit: every writer, scale 1, untie.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Remove `scale` times the projection (method.md §6, scale variant); 1 is the paper's edit.
    pub scale: f64,
    /// Decoder layers whose writers are edited; `None` means all. The embedding belongs to no
    /// layer: `--layers` never excludes it, only [`Options::skip_embeddings`] does.
    pub layers: Option<LayerSet>,
    /// Leave the token embedding unedited.
    pub skip_embeddings: bool,
    /// Globs on tensor names. Matching tensors are copied unchanged (writers included) and an
    /// unknown tensor that matches is no longer an error. All are reported.
    pub exclude: Vec<String>,
    /// With tied embeddings, keep the tie (the edit then also changes the unembedding) instead of
    /// writing the original embedding as an untied `lm_head.weight` (method.md §6, tied embeddings).
    pub keep_tie: bool,
    /// After removing the direction, restore the norm of every vector a writer adds to the residual
    /// stream (every column of the writer view; docs/variants.md, norm-preserving edits).
    pub norm_preserving: bool,
    /// A weight per layer and writer kind, multiplying `scale` (docs/variants.md, layer kernels).
    pub kernel: LayerKernel,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            scale: 1.0,
            layers: None,
            skip_embeddings: false,
            exclude: Vec::new(),
            keep_tie: false,
            norm_preserving: false,
            kernel: LayerKernel::default(),
        }
    }
}

/// A set of decoder layers, written like `0-10,12` (inclusive ranges and single layers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSet {
    spec: String,
    ranges: Vec<(usize, usize)>,
}

impl LayerSet {
    pub fn parse(spec: &str) -> Result<LayerSet> {
        let bad = |problem: String| Error::Layers { spec: spec.to_string(), problem };
        let mut ranges = Vec::new();
        for part in spec.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad("empty item; write layers like `0-10,12`".into()));
            }
            let num = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{s}` is not a layer number; write layers like `0-10,12`")))
            };
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(part)?;
                    (n, n)
                }
            };
            if a > b {
                return Err(bad(format!("range `{part}` is empty (its start is after its end)")));
            }
            ranges.push((a, b));
        }
        Ok(LayerSet { spec: spec.to_string(), ranges })
    }

    pub fn contains(&self, layer: usize) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..=b).contains(&layer))
    }

    /// The largest layer named.
    pub fn max(&self) -> usize {
        self.ranges.iter().map(|&(_, b)| b).max().unwrap_or(0)
    }

    /// The text it was parsed from.
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

impl FromStr for LayerSet {
    type Err = Error;
    fn from_str(s: &str) -> Result<LayerSet> {
        LayerSet::parse(s)
    }
}

impl fmt::Display for LayerSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

/// Which unit vector a tensor is orthogonalized against.
#[derive(Clone, Debug, PartialEq)]
pub enum Against {
    /// `r̂ = r/||r||`.
    Direction,
    /// Gemma 2/3: `ŝ = (g ⊙ r̂)/||g ⊙ r̂||` with `g = 1 + w` of the post-norm `norm` that follows
    /// this writer in its layer (method.md §6, post-attention and post-feedforward RMSNorm).
    GainWeighted { norm: String, norm_tensor: TensorRef },
}

impl Against {
    /// `r` or `s(NORM)` ([`checkpoint::roles::unit_label`]).
    pub fn label(&self) -> String {
        match self {
            Against::Direction => checkpoint::roles::unit_label(None),
            Against::GainWeighted { norm, .. } => checkpoint::roles::unit_label(Some(norm)),
        }
    }
}

/// One tensor the edit rewrites.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEdit {
    pub name: String,
    pub tensor: TensorRef,
    /// Shard file name.
    pub file: String,
    pub writer: Writer,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: u64,
    pub against: Against,
    /// The scale actually applied: `Options::scale` times [`TensorEdit::weight`].
    pub scale: f64,
    /// The layer kernel's weight of this writer (1 without a kernel).
    pub weight: f64,
}

impl TensorEdit {
    /// `attn_out`, `mlp_down`, ... with `_bias` for biases ([`Writer::label`]).
    pub fn kind_label(&self) -> String {
        self.writer.label()
    }
}

/// A tensor the edit adds: the untied LM head, a byte copy of the original embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Added {
    pub name: String,
    /// Shard it is appended to (the one holding the embedding), or that holds the tensor it replaces.
    pub file: String,
    /// A stored tensor of the same name, dtype and shape whose bytes it takes the place of, at the
    /// same offsets: an `lm_head.weight` that config.json's tie made loaders ignore.
    pub replaces: Option<TensorRef>,
    /// The tensor whose original bytes it copies.
    pub copy_of: String,
    pub source: TensorRef,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExcludeReason {
    /// Matched an `--exclude` glob.
    Pattern(String),
    /// A writer of a layer outside `--layers`.
    Layers,
    /// The embedding, with `--skip-embeddings`.
    SkipEmbeddings,
    /// The layer kernel gives this writer weight 0.
    ZeroWeight,
}

impl fmt::Display for ExcludeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExcludeReason::Pattern(p) => write!(f, "--exclude `{p}`"),
            ExcludeReason::Layers => f.write_str("--layers"),
            ExcludeReason::SkipEmbeddings => f.write_str("--skip-embeddings"),
            ExcludeReason::ZeroWeight => f.write_str("layer kernel weight 0"),
        }
    }
}

/// A tensor left unedited on purpose (copied bit for bit).
#[derive(Clone, Debug, PartialEq)]
pub struct Excluded {
    pub name: String,
    pub file: String,
    pub role: Role,
    pub reason: ExcludeReason,
}

/// What happens to tied embeddings (the rule of what the head reads is [`Checkpoint::head`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tie {
    /// The checkpoint stores its own LM head (or the config unties it): nothing to do.
    NotTied,
    /// Tied, and the embedding is edited: add `lm_head.weight` = the original embedding and write
    /// `tie_word_embeddings: false` (the default; method.md §6 project decision).
    Untie,
    /// Tied, the embedding is edited, and `--keep-tie`: the unembedding changes too, so the edited
    /// model is not equivalent to ablation (method.md §7, where the equivalence fails, 1).
    KeepTie,
    /// Tied, but the embedding is not edited: the tie stays and the head is unchanged.
    TiedUnedited,
}

impl Tie {
    /// The one label of each case, in every JSON output (`inspect`, `edit --dry-run`, the manifest).
    pub fn label(self) -> &'static str {
        match self {
            Tie::NotTied => "not_tied",
            Tie::Untie => "untied",
            Tie::KeepTie => "kept_tie",
            Tie::TiedUnedited => "tied_unedited",
        }
    }
}

/// How often each `--exclude` glob matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternUse {
    pub pattern: String,
    pub matched: usize,
}

/// Everything an edit would do, before doing it.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub family: Family,
    pub options: Options,
    /// Tensors to rewrite, in [`Checkpoint::tensors`] order.
    pub edits: Vec<TensorEdit>,
    /// Tensors to add.
    pub added: Vec<Added>,
    /// Tensors deliberately left unedited, with why.
    pub excluded: Vec<Excluded>,
    pub patterns: Vec<PatternUse>,
    /// What the input's LM head reads.
    pub head: Head,
    pub tie: Tie,
    /// Tensors copied unchanged (everything not in `edits`), and their bytes.
    pub unchanged: usize,
    pub unchanged_bytes: u64,
}

impl Plan {
    /// Bytes of tensor data rewritten.
    pub fn edit_bytes(&self) -> u64 {
        self.edits.iter().map(|e| e.bytes).sum()
    }

    /// Bytes of tensor data added (appended; a tensor that replaces a stored one adds none).
    pub fn added_bytes(&self) -> u64 {
        self.added.iter().filter(|a| a.replaces.is_none()).map(|a| a.bytes).sum()
    }

    /// What the edit does about tied embeddings, in one sentence.
    pub fn tie_note(&self) -> String {
        match (self.tie, self.head) {
            (Tie::NotTied, _) => "the checkpoint stores its own lm_head; nothing to untie".into(),
            (Tie::Untie, Head::TiedIgnoringStored { identical: false }) => format!(
                "untied: config.json tied the LM head to the embedding, so loaders (transformers 4.57, the \
                 runtime) ignored the stored, different `{}`; it is replaced by the original embedding and \
                 tie_word_embeddings is false, so the edited model equals directional ablation (docs/method.md §6)",
                self.added.first().map_or("lm_head.weight", |a| a.name.as_str())
            ),
            (Tie::Untie, Head::TiedIgnoringStored { identical: true }) => {
                "untied: the stored lm_head.weight is already a copy of the original embedding; it is kept and \
                 tie_word_embeddings is false, so the edited model equals directional ablation (docs/method.md §6)"
                    .into()
            }
            (Tie::Untie, _) => "untied: lm_head.weight is the original embedding and tie_word_embeddings is false, \
                                so the edited model equals directional ablation (docs/method.md §6)"
                .into(),
            (Tie::KeepTie, _) => "--keep-tie: the embedding is tied to the LM head, so the edit also changes the \
                                  unembedding; the edited model is not equivalent to directional ablation \
                                  (docs/method.md §6)"
                .into(),
            (Tie::TiedUnedited, _) => "tied embeddings left tied: the embedding is not edited".into(),
        }
    }

    /// Number of edited tensors per writer label, in a stable order.
    pub fn counts_by_kind(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for kind in WriterKind::ALL {
            for bias in [false, true] {
                let n = self.edits.iter().filter(|e| e.writer.kind == kind && e.writer.bias == bias).count();
                if n > 0 {
                    let w = Writer { kind, layer: None, expert: None, bias, model_axis: 0 };
                    out.push((w.label(), n));
                }
            }
        }
        out
    }

    /// The basis of every edit, in `edits` order: the one `directions` gives its layer (one shared
    /// allocation per distinct basis), or for Gemma 2/3 post-norm writers the gain-weighted one. Reads
    /// only the post-norm gains. A gain-weighted basis that vanishes (`g ⊙ v = 0` for every vector) is
    /// one zero vector: the write is already orthogonal and the kernel leaves the tensor bit for bit
    /// unchanged.
    pub fn bases(&self, ckpt: &Checkpoint, directions: &Directions) -> Result<Vec<Arc<Basis>>> {
        let d = ckpt.config.hidden_size;
        let n_layers = ckpt.config.num_hidden_layers;
        if directions.for_layer(None).d() != d {
            return Err(Error::Direction(crate::DirectionError::Invalid {
                path: directions.path.clone(),
                problem: format!(
                    "`direction` has length {} but the model's hidden_size is {d}",
                    directions.for_layer(None).d()
                ),
            }));
        }
        if directions.layout == direction::Layout::PerLayer && directions.layers() != n_layers {
            return Err(Error::Direction(crate::DirectionError::Invalid {
                path: directions.path.clone(),
                problem: format!("holds {} layers but the model has {n_layers}", directions.layers()),
            }));
        }
        let mut gain_weighted: HashMap<(usize, usize, usize), Arc<Basis>> = HashMap::new();
        let mut out = Vec::with_capacity(self.edits.len());
        for e in &self.edits {
            let basis = directions.for_layer(e.writer.layer);
            match &e.against {
                Against::Direction => out.push(basis.clone()),
                Against::GainWeighted { norm_tensor, .. } => {
                    let key = (norm_tensor.shard, norm_tensor.entry, Arc::as_ptr(basis) as usize);
                    if let Some(s) = gain_weighted.get(&key) {
                        out.push(s.clone());
                        continue;
                    }
                    let s = Arc::new(gain_weighted_basis(ckpt, *norm_tensor, basis)?);
                    gain_weighted.insert(key, s.clone());
                    out.push(s);
                }
            }
        }
        Ok(out)
    }
}

/// One edited write as the hooks see it (docs/variants.md, "Hooks"): the residual-stream write of a layer's
/// attention or MLP (`site`), or the embedding (`layer` None: the residual entering layer 0), with the basis
/// and scale its tensors were edited with. What `verify` projects at that site to reproduce the edit.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOp {
    pub layer: Option<usize>,
    /// None for the embedding.
    pub site: Option<Site>,
    pub basis: Arc<Basis>,
    pub scale: f64,
    /// Norm-preserving edits: exact as a hook only for the embedding (each token's row is one written
    /// vector); for weights the hook of the same name is not the edit (docs/variants.md).
    pub norm_preserving: bool,
}

impl Plan {
    /// The edit's writes, one per (layer, site), in plan order, from `bases` ([`Plan::bases`]). Tensors of
    /// one site (a weight and its bias, the experts of a layer) share a basis and a scale by construction.
    pub fn write_ops(&self, bases: &[Arc<Basis>]) -> Vec<WriteOp> {
        let mut out: Vec<WriteOp> = Vec::new();
        for (e, b) in self.edits.iter().zip(bases) {
            let (layer, site) = (e.writer.layer, e.writer.site());
            if out.iter().any(|o| o.layer == layer && o.site == site) {
                continue;
            }
            out.push(WriteOp {
                layer,
                site,
                basis: b.clone(),
                scale: e.scale,
                norm_preserving: self.options.norm_preserving,
            });
        }
        out
    }
}

/// The gain-weighted basis of a post-norm writer: an orthonormal basis of `{g ⊙ v_m}` (MGS2, in order;
/// for one vector exactly `ŝ` below), dropping a vector the gain maps into the span of the others.
fn gain_weighted_basis(ckpt: &Checkpoint, norm: TensorRef, basis: &Basis) -> Result<Basis> {
    let d = basis.d();
    if basis.k() == 1 {
        // One vector: exactly ŝ as method.md §6 computes it (zeros where g ⊙ r̂ = 0).
        return Ok(Basis::from_orthonormal(d, ckpt.gain_weighted_unit(norm, basis.vector(0))?));
    }
    let mut kept: Vec<Vec<f64>> = Vec::new();
    for v in basis.vectors() {
        let s = ckpt.gain_weighted_unit(norm, v)?;
        if s.iter().all(|x| *x == 0.0) {
            continue;
        }
        let mut candidate: Vec<&[f64]> = kept.iter().map(Vec::as_slice).collect();
        candidate.push(&s);
        if Basis::orthonormalize(&candidate).is_ok() {
            kept.push(s);
        }
    }
    if kept.is_empty() {
        return Ok(Basis::from_orthonormal(d, vec![0.0; d]));
    }
    let rows: Vec<&[f64]> = kept.iter().map(Vec::as_slice).collect();
    Ok(Basis::orthonormalize(&rows).expect("the kept vectors were checked independent one by one"))
}

/// The LM head name that unties a given embedding name.
fn lm_head_name(embedding: &str) -> String {
    match embedding.strip_suffix("model.embed_tokens.weight") {
        // `language_model.model.embed_tokens.weight` (older multimodal Gemma 3 layout)
        Some(prefix) if prefix.ends_with("language_model.") => format!("{prefix}lm_head.weight"),
        _ => "lm_head.weight".to_string(),
    }
}

/// Compiled `--exclude` globs, each matched on its own so that we can say which one excluded what.
struct Excludes {
    globs: Vec<(String, globset::GlobMatcher)>,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Excludes> {
        let mut globs = Vec::new();
        for p in patterns {
            let g = globset::GlobBuilder::new(p)
                .literal_separator(false)
                .build()
                .map_err(|e| Error::Pattern { pattern: p.clone(), reason: e.kind().to_string() })?;
            globs.push((p.clone(), g.compile_matcher()));
        }
        Ok(Excludes { globs })
    }

    /// The first glob matching `name`.
    fn matching(&self, name: &str) -> Option<&str> {
        self.globs.iter().find(|(_, g)| g.is_match(name)).map(|(p, _)| p.as_str())
    }
}

/// The tensors [`plan`] would refuse as unknown: no role in the family, and no `--exclude` glob
/// of `opts` matches them. In header order.
pub fn unknown_tensors(ckpt: &Checkpoint, opts: &Options) -> Result<Vec<TensorRef>> {
    let excludes = Excludes::new(&opts.exclude)?;
    Ok(ckpt
        .tensors()
        .filter(|(r, t)| ckpt.role(*r) == Role::Unknown && excludes.matching(&t.name).is_none())
        .map(|(r, _)| r)
        .collect())
}

/// An `--exclude` pattern that matches exactly one tensor name (glob characters escaped).
pub fn exact_pattern(name: &str) -> String {
    globset::escape(name)
}

/// Decides what an edit of `ckpt` with `opts` rewrites, adds and leaves alone.
///
/// Fails (naming the tensor) on an unknown tensor that no `--exclude` matches, a writer whose
/// dtype or shape is wrong, a layer outside the model, a bad glob or a non-finite scale.
pub fn plan(ckpt: &Checkpoint, opts: &Options) -> Result<Plan> {
    if !opts.scale.is_finite() {
        return Err(Error::Scale(opts.scale));
    }
    if let Some(crate::layer_kernel::Profile::Table(w)) = opts.kernel.attn.as_ref().or(opts.kernel.mlp.as_ref())
        && w.len() != ckpt.config.num_hidden_layers
    {
        return Err(Error::Kernel {
            spec: "layer kernel table".into(),
            problem: format!("has {} weights but the model has {} layers", w.len(), ckpt.config.num_hidden_layers),
        });
    }
    let n_layers = ckpt.config.num_hidden_layers;
    if let Some(ls) = &opts.layers
        && ls.max() >= n_layers
    {
        return Err(Error::Layers {
            spec: ls.spec().to_string(),
            problem: format!("names layer {} but the model has {n_layers} layers (0-{})", ls.max(), n_layers - 1),
        });
    }
    let excludes = Excludes::new(&opts.exclude)?;
    let roles = ckpt.check_roles(|name| excludes.matching(name).is_some())?;

    // Gemma 2/3: the post-norm that follows each writer site.
    let mut post_norms: HashMap<(usize, Site), (TensorRef, String)> = HashMap::new();
    for ((r, t), role) in ckpt.tensors().zip(&roles) {
        if let Role::PostNorm { layer, site } = role {
            post_norms.insert((*layer, *site), (r, t.name.clone()));
        }
    }

    let mut edits = Vec::new();
    let mut excluded = Vec::new();
    let mut matched = vec![0usize; opts.exclude.len()];
    let mut unchanged = 0usize;
    let mut unchanged_bytes = 0u64;
    let mut embedding: Option<(TensorRef, String)> = None;
    let mut embedding_edited = false;
    for ((r, t), role) in ckpt.tensors().zip(&roles) {
        let file = ckpt.file_of(r).to_string();
        let pattern = excludes.matching(&t.name);
        if let Some(p) = pattern {
            let i = opts.exclude.iter().position(|q| q == p).expect("the glob came from opts.exclude");
            matched[i] += 1;
        }
        let reason = match (role, pattern) {
            (_, Some(p)) => Some(ExcludeReason::Pattern(p.to_string())),
            (Role::Writer(w), None) if w.kind == WriterKind::Embedding && opts.skip_embeddings => {
                Some(ExcludeReason::SkipEmbeddings)
            }
            (Role::Writer(w), None) => match (w.layer, &opts.layers) {
                (Some(l), Some(ls)) if !ls.contains(l) => Some(ExcludeReason::Layers),
                _ => None,
            },
            _ => None,
        };
        if let Role::Writer(w) = role
            && w.kind == WriterKind::Embedding
        {
            embedding = Some((r, t.name.clone()));
        }
        let Role::Writer(w) = role else {
            if let Some(reason) = reason {
                excluded.push(Excluded { name: t.name.clone(), file, role: *role, reason });
            }
            unchanged += 1;
            unchanged_bytes += t.nbytes() as u64;
            continue;
        };
        let weight = opts.kernel.weight(w);
        let reason = reason.or((weight == 0.0).then_some(ExcludeReason::ZeroWeight));
        if let Some(reason) = reason {
            excluded.push(Excluded { name: t.name.clone(), file, role: *role, reason });
            unchanged += 1;
            unchanged_bytes += t.nbytes() as u64;
            continue;
        }
        let against = match (ckpt.config.family.has_post_norms(), w.layer, w.site()) {
            (true, Some(layer), Some(site)) => {
                let (norm_tensor, norm) = post_norms.get(&(layer, site)).cloned().ok_or_else(|| {
                    ckpt.tensor_error(
                        r,
                        format!(
                            "{} writes through a post-norm, but layer {layer} has no `{}` (docs/method.md §6)",
                            ckpt.config.family.name(),
                            match site {
                                Site::Attn => "post_attention_layernorm.weight",
                                Site::Mlp => "post_feedforward_layernorm.weight",
                            }
                        ),
                    )
                })?;
                Against::GainWeighted { norm, norm_tensor }
            }
            _ => Against::Direction,
        };
        if w.kind == WriterKind::Embedding {
            embedding_edited = true;
        }
        edits.push(TensorEdit {
            name: t.name.clone(),
            tensor: r,
            file,
            writer: *w,
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.nbytes() as u64,
            against,
            scale: opts.scale * weight,
            weight,
        });
    }

    let head = ckpt.head();
    let tie = match (head.tied(), embedding_edited, opts.keep_tie) {
        (false, _, _) => Tie::NotTied,
        (true, false, _) => Tie::TiedUnedited,
        (true, true, true) => Tie::KeepTie,
        (true, true, false) => Tie::Untie,
    };
    let stored_head = ckpt.lm_head_name().and_then(|n| ckpt.get(n)).map(|(r, t)| (r, t.name.clone()));
    if let (Tie::KeepTie, Head::TiedIgnoringStored { .. }, Some((_, name))) = (tie, head, &stored_head) {
        return Err(Error::KeepTieStoredHead { name: name.clone() });
    }
    let mut added = Vec::new();
    if tie == Tie::Untie && head != (Head::TiedIgnoringStored { identical: true }) {
        let (source, name) = embedding.expect("an edited embedding was seen");
        let t = ckpt.entry(source);
        // A stored head that the tie made loaders ignore is replaced in place by the original
        // embedding (so that every loader reads the same head); otherwise the head is appended.
        let (head_name, file, replaces) = match &stored_head {
            Some((r, head_name)) => {
                let h = ckpt.entry(*r);
                if h.dtype != t.dtype || h.shape != t.shape {
                    return Err(ckpt
                        .tensor_error(
                            *r,
                            format!(
                                "config.json ties the LM head to the embedding, so this stored head is ignored; \
                                 untying must replace it with the original embedding `{name}`, but it is {} {:?} \
                                 and the embedding is {} {:?}",
                                h.dtype, h.shape, t.dtype, t.shape
                            ),
                        )
                        .into());
                }
                (head_name.clone(), ckpt.file_of(*r).to_string(), Some(*r))
            }
            None => (lm_head_name(&name), ckpt.file_of(source).to_string(), None),
        };
        added.push(Added {
            name: head_name,
            file,
            replaces,
            copy_of: name,
            source,
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: t.nbytes() as u64,
        });
    }
    let patterns =
        opts.exclude.iter().zip(matched).map(|(p, matched)| PatternUse { pattern: p.clone(), matched }).collect();
    Ok(Plan {
        family: ckpt.config.family,
        options: opts.clone(),
        edits,
        added,
        excluded,
        patterns,
        head,
        tie,
        unchanged,
        unchanged_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_sets_parse_ranges_and_reject_nonsense() {
        let s = LayerSet::parse("0-2, 5").unwrap();
        assert!(s.contains(0) && s.contains(2) && s.contains(5) && !s.contains(3));
        assert_eq!(s.max(), 5);
        let e = |s: &str| LayerSet::parse(s).unwrap_err().to_string();
        assert_eq!(e("3-1"), "--layers `3-1`: range `3-1` is empty (its start is after its end)");
        assert_eq!(e("a"), "--layers `a`: `a` is not a layer number; write layers like `0-10,12`");
        assert_eq!(e("1,,2"), "--layers `1,,2`: empty item; write layers like `0-10,12`");
    }

    #[test]
    fn lm_head_follows_the_embedding_layout() {
        assert_eq!(lm_head_name("model.embed_tokens.weight"), "lm_head.weight");
        assert_eq!(lm_head_name("model.language_model.embed_tokens.weight"), "lm_head.weight");
        assert_eq!(lm_head_name("language_model.model.embed_tokens.weight"), "language_model.lm_head.weight");
    }
}
