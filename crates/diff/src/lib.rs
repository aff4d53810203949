//! Tensor-by-tensor comparison of two checkpoints A and B: which tensors are identical, which
//! changed and how (max `|dW|`, relative Frobenius norm, numerical rank, and with a direction the
//! alignment of `dW`'s column space with it and how much of it B still writes), which exist on one
//! side only, and what changed in config.json and the other files.
//!
//! Two checkpoints are never loaded: tensors are compared one pair at a time straight from the
//! memory maps (bytes first; only a pair whose bytes differ is decoded, in small pieces, see
//! [`sketch`]), pairs in parallel. Results do not depend on the thread count.
//!
//! This crate only measures. What is printed, and the exit code of the `--expect-orthogonal`
//! gate, belong to the CLI.

pub mod detect;
pub mod sketch;

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use checkpoint::{Checkpoint, Dtype, Role, Site, TensorRef, Writer, WriterKind};
use rayon::prelude::*;
use serde_json::{Map, Value};

pub use sketch::{MAX_EXACT_RANK, SKETCH, SliceRank};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is in the message, so it is not also a `source()` (the CLI prints chains).
    #[error("`{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("the direction has length {len} but B's hidden_size is {hidden}")]
    DirectionLength { len: usize, hidden: usize },
    #[error(
        "A's hidden_size is {a} but B's is {b}: one direction cannot be measured in both; compare without --direction"
    )]
    HiddenSize { a: usize, b: usize },
    #[error("tensor `{name}` in `{file}`: {problem}")]
    Tensor { name: String, file: String, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to compare against.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// The unit direction `r̂` (length B's hidden_size). With it, residual writers get their
    /// projection on it, the alignment of their change with it, and the gate's ratio.
    pub direction: Option<Vec<f64>>,
}

/// What happened to one tensor name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Same dtype, shape and bytes.
    Identical,
    /// Same dtype and shape, different bytes.
    Changed,
    /// Same shape, another dtype (values are compared when both are float types).
    DtypeChanged,
    /// Another shape: values cannot be compared.
    ShapeChanged,
    OnlyInA,
    OnlyInB,
}

impl Status {
    /// Every status, in the order reports list them.
    pub const ALL: [Status; 6] = [
        Status::Identical,
        Status::Changed,
        Status::DtypeChanged,
        Status::ShapeChanged,
        Status::OnlyInA,
        Status::OnlyInB,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Status::Identical => "identical",
            Status::Changed => "changed",
            Status::DtypeChanged => "dtype_changed",
            Status::ShapeChanged => "shape_changed",
            Status::OnlyInA => "only_in_a",
            Status::OnlyInB => "only_in_b",
        }
    }
}

/// A tensor as stored on one side.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Shard file name.
    pub file: String,
    pub bytes: u64,
}

/// The unit vector a writer is measured against.
#[derive(Clone, Debug, PartialEq)]
pub enum Against {
    /// `r̂` itself.
    Direction,
    /// Gemma 2/3 writers followed by a post-norm: `ŝ = (g ⊙ r̂)/||g ⊙ r̂||` with `g = 1 + w` of B's
    /// post-norm `norm` (method.md §6). `ŝ` is what the edit zeroes, and `ŝᵀW = 0` is exactly
    /// "the block writes nothing along `r̂`" (`r̂ᵀ(g ⊙ u) = ||g ⊙ r̂|| ŝᵀu`), so the gate checks `ŝ`.
    GainWeighted { norm: String },
}

impl Against {
    /// `r` or `s(NORM)` ([`checkpoint::roles::unit_label`]).
    pub fn label(&self) -> String {
        match self {
            Against::Direction => checkpoint::roles::unit_label(None),
            Against::GainWeighted { norm } => checkpoint::roles::unit_label(Some(norm)),
        }
    }
}

/// How a tensor's values changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub max_abs: f64,
    /// `||dW||_F`.
    pub frobenius: f64,
    /// `||dW||_F / ||W_A||_F` (None when `W_A` is zero).
    pub rel_frobenius: Option<f64>,
    /// The largest rank over the slices.
    pub rank: usize,
    /// False when some slice's rank exceeded [`MAX_EXACT_RANK`] (then `rank` is that plus one and
    /// means "more than").
    pub rank_exact: bool,
    /// One per matrix: a single one, or one per expert of a fused 3-D expert tensor.
    pub slices: Vec<SliceRank>,
    /// With a direction: the smallest alignment over the slices that changed (1 when every
    /// change lies along the direction).
    pub alignment: Option<f64>,
    /// With a direction: `||d̂ᵀW_B|| / ||d̂ᵀW_A||` (None when A's projection is zero).
    pub projection_ratio: Option<f64>,
}

/// One tensor name of A or B.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiff {
    pub name: String,
    /// Role in B (in A for a tensor only in A).
    pub role: Role,
    pub status: Status,
    pub a: Option<Side>,
    pub b: Option<Side>,
    pub change: Option<Change>,
    /// With a direction, for residual writers of B: what they are measured against.
    pub against: Option<Against>,
    /// With a direction, for residual writers of B: `||d̂ᵀW_B|| / ||W_B||_F`, what the gate checks.
    /// None for a writer whose dtype cannot be decoded.
    pub orthogonality: Option<f64>,
}

impl TensorDiff {
    pub fn kind(&self) -> String {
        self.role.label()
    }

    pub fn is_b_writer(&self) -> bool {
        self.b.is_some() && matches!(self.role, Role::Writer(_))
    }
}

/// One config.json key (dotted for nested objects) whose value differs.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigChange {
    pub key: String,
    pub a: Option<Value>,
    pub b: Option<Value>,
}

/// Files of the model directories other than the weights, the index and config.json.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileChanges {
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
    pub changed: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub config: Vec<ConfigChange>,
    pub files: FileChanges,
    /// Every tensor name of A and B, in natural order (`layers.2` before `layers.10`).
    pub tensors: Vec<TensorDiff>,
}

/// Compares A and B. `progress` is called with the bytes of each tensor pair when it is done.
pub fn diff(a: &Checkpoint, b: &Checkpoint, options: &Options, progress: &(dyn Fn(u64) + Sync)) -> Result<Report> {
    let directions = match &options.direction {
        Some(r) => Some(Directions::new(a, b, r)?),
        None => None,
    };
    let pairs = pairs(a, b);
    let tensors = pairs
        .par_iter()
        .map(|p| {
            let t = compare(a, b, p, directions.as_ref());
            // Done with this pair: keep the resident set from growing with the checkpoints.
            p.a.iter().for_each(|&r| a.release(r));
            p.b.iter().for_each(|&r| b.release(r));
            progress(p.b.map(|r| b.entry(r)).or(p.a.map(|r| a.entry(r))).map_or(0, |t| t.nbytes() as u64));
            t
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Report { config: config_changes(&a.config.file, &b.config.file), files: file_changes(a, b)?, tensors })
}

/// A tensor name and where it is on each side.
struct Pair {
    name: String,
    a: Option<TensorRef>,
    b: Option<TensorRef>,
}

fn pairs(a: &Checkpoint, b: &Checkpoint) -> Vec<Pair> {
    let mut names: Vec<&str> = a.tensors().map(|(_, t)| t.name.as_str()).collect();
    let in_a: HashSet<&str> = names.iter().copied().collect();
    names.extend(b.tensors().map(|(_, t)| t.name.as_str()).filter(|n| !in_a.contains(n)));
    names.sort_by(|x, y| natural_cmp(x, y));
    names
        .into_iter()
        .map(|n| Pair { name: n.to_string(), a: a.get(n).map(|(r, _)| r), b: b.get(n).map(|(r, _)| r) })
        .collect()
}

/// Orders names with their digit runs compared as numbers.
pub fn natural_cmp(x: &str, y: &str) -> Ordering {
    let (mut xs, mut ys) = (x.as_bytes(), y.as_bytes());
    loop {
        match (xs.first(), ys.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(cx), Some(cy)) if cx.is_ascii_digit() && cy.is_ascii_digit() => {
                let nx = xs.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = ys.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (trim_zeros(&xs[..nx]), trim_zeros(&ys[..ny]));
                let ord = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy)).then_with(|| nx.cmp(&ny));
                if ord != Ordering::Equal {
                    return ord;
                }
                xs = &xs[nx..];
                ys = &ys[ny..];
            }
            (Some(cx), Some(cy)) => {
                if cx != cy {
                    return cx.cmp(cy);
                }
                xs = &xs[1..];
                ys = &ys[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

/// Sort position of a kind in summaries: writers first (in `WriterKind::ALL` order), then
/// post-norms, then the rest by name.
fn kind_order(role: &Role) -> (usize, String) {
    match role {
        Role::Writer(w) => {
            (WriterKind::ALL.iter().position(|k| *k == w.kind).unwrap_or(0) * 2 + w.bias as usize, String::new())
        }
        Role::PostNorm { .. } => (100, String::new()),
        Role::Unknown => (300, String::new()),
        r => (200, r.label()),
    }
}

/// `r̂`, and for Gemma 2/3 the gain-weighted `ŝ` of every post-norm of B.
struct Directions {
    r: Vec<f64>,
    /// (layer, site) -> (post-norm name, ŝ).
    s: HashMap<(usize, Site), (String, Vec<f64>)>,
}

impl Directions {
    fn new(a: &Checkpoint, b: &Checkpoint, r: &[f64]) -> Result<Directions> {
        let hidden = b.config.hidden_size;
        if r.len() != hidden {
            return Err(Error::DirectionLength { len: r.len(), hidden });
        }
        if a.config.hidden_size != hidden {
            return Err(Error::HiddenSize { a: a.config.hidden_size, b: hidden });
        }
        let mut s = HashMap::new();
        if b.config.family.has_post_norms() {
            for (tr, t) in b.tensors() {
                let Role::PostNorm { layer, site } = b.role(tr) else { continue };
                let unit = b.gain_weighted_unit(tr, r).map_err(tensor_error)?;
                s.insert((layer, site), (t.name.clone(), unit));
            }
        }
        Ok(Directions { r: r.to_vec(), s })
    }

    /// What writer `w` of B is measured against.
    fn for_writer(&self, w: &Writer) -> (Against, &[f64]) {
        if let (Some(layer), Some(site)) = (w.layer, w.site())
            && let Some((norm, s)) = self.s.get(&(layer, site))
        {
            return (Against::GainWeighted { norm: norm.clone() }, s);
        }
        (Against::Direction, &self.r)
    }
}

pub(crate) fn tensor_error(e: checkpoint::Error) -> Error {
    match e {
        checkpoint::Error::Tensor { name, file, problem } => Error::Tensor { name, file, problem },
        other => Error::Tensor { name: String::new(), file: String::new(), problem: other.to_string() },
    }
}

fn side(c: &Checkpoint, r: TensorRef) -> Side {
    let t = c.entry(r);
    Side { dtype: t.dtype, shape: t.shape.clone(), file: c.file_of(r).to_string(), bytes: t.nbytes() as u64 }
}

/// How a tensor of `shape` with role `role` is seen as matrices: a writer around its d_model axis
/// (`Writer::view`), anything else as `[.., rows, cols]`; 3-D tensors are one matrix per leading
/// index (fused experts).
pub(crate) fn layout(role: &Role, shape: &[usize], hidden: usize) -> Option<sketch::Layout> {
    let per_outer = shape.len() >= 3;
    if let Role::Writer(w) = role {
        if shape.len() > w.model_axis && shape[w.model_axis] == hidden {
            let (outer, rows, inner) = w.view(shape);
            return Some(sketch::Layout { outer, rows, inner, per_outer });
        }
        return None;
    }
    let (outer, rows, inner) = match shape.len() {
        0 => (1, 1, 1),
        1 => (1, shape[0], 1),
        n => (shape[..n - 2].iter().product(), shape[n - 2], shape[n - 1]),
    };
    Some(sketch::Layout { outer, rows, inner, per_outer })
}

fn compare(a: &Checkpoint, b: &Checkpoint, p: &Pair, dirs: Option<&Directions>) -> Result<TensorDiff> {
    let role = match (p.a, p.b) {
        (_, Some(rb)) => b.role(rb),
        (Some(ra), None) => a.role(ra),
        (None, None) => unreachable!("a pair comes from a tensor of A or B"),
    };
    let side_a = p.a.map(|r| side(a, r));
    let side_b = p.b.map(|r| side(b, r));
    let status = match (&side_a, &side_b) {
        (Some(_), None) => Status::OnlyInA,
        (None, Some(_)) => Status::OnlyInB,
        (Some(sa), Some(sb)) if sa.shape != sb.shape => Status::ShapeChanged,
        (Some(sa), Some(sb)) if sa.dtype != sb.dtype => Status::DtypeChanged,
        (Some(_), Some(_)) if a.bytes(p.a.expect("both")) == b.bytes(p.b.expect("both")) => Status::Identical,
        _ => Status::Changed,
    };
    let hidden = b.config.hidden_size;
    // The direction this tensor is measured against: residual writers of B only.
    let against = match (&role, dirs, p.b) {
        (Role::Writer(w), Some(d), Some(_)) => Some(d.for_writer(w)),
        _ => None,
    };
    let lay = side_b.as_ref().or(side_a.as_ref()).and_then(|s| layout(&role, &s.shape, hidden));
    if against.is_some() && lay.is_none() {
        let rb = p.b.expect("against implies B");
        let Role::Writer(w) = role else { unreachable!("against implies a writer") };
        return Err(Error::Tensor {
            name: p.name.clone(),
            file: b.file_of(rb).to_string(),
            problem: format!(
                "a residual writer of shape {:?} whose axis {} should be d_model (hidden_size {hidden}); \
                 it cannot be measured against the direction",
                b.entry(rb).shape,
                w.model_axis
            ),
        });
    }
    let dir = against.as_ref().map(|(_, v)| *v);
    let release_a = p.a.map(|r| releaser(a, r));
    let release_b = p.b.map(|r| releaser(b, r));
    let mut change = None;
    let mut b_sums = None;
    if let (Some(ra), Some(rb), Some(lay), Some(rel_a), Some(rel_b)) = (p.a, p.b, lay, &release_a, &release_b)
        && matches!(status, Status::Changed | Status::DtypeChanged)
        && let (Some(sa), Some(sb)) = (stored(a, ra, rel_a), stored(b, rb, rel_b))
    {
        let m = sketch::measure(sa, sb, lay, dir).map_err(|problem| Error::Tensor {
            name: p.name.clone(),
            file: b.file_of(rb).to_string(),
            problem,
        })?;
        change = Some(to_change(&m, dir.is_some()));
        b_sums = Some(m.sums);
    }
    let mut orthogonality = None;
    if let (Some(_), Some(rb), Some(lay), Some(rel_b)) = (dir, p.b, lay, &release_b)
        && let Some(sb) = stored(b, rb, rel_b)
    {
        let sums = match b_sums {
            Some(s) => s,
            None => sketch::measure_b(sb, lay, dir),
        };
        orthogonality = Some(if sums.ss_b > 0.0 { (sums.proj_b / sums.ss_b).sqrt() } else { 0.0 });
    }
    Ok(TensorDiff {
        name: p.name.clone(),
        role,
        status,
        a: side_a,
        b: side_b,
        change,
        against: against.map(|(a, _)| a),
        orthogonality,
    })
}

/// A float tensor's bytes; None for other dtypes, whose values are not compared. `release` drops
/// the mapped pages of byte ranges of it that a pass is done with.
fn stored<'a>(
    c: &'a Checkpoint,
    r: TensorRef,
    release: &'a (dyn Fn(std::ops::Range<usize>) + Sync),
) -> Option<sketch::Stored<'a>> {
    let t = c.entry(r);
    t.dtype.is_float().then(|| sketch::Stored { dtype: t.dtype, bytes: c.bytes(r), release: Some(release) })
}

/// Releases byte ranges of a tensor's data (relative to its first byte) in its shard's map.
fn releaser(c: &Checkpoint, r: TensorRef) -> impl Fn(std::ops::Range<usize>) + Sync + '_ {
    let shard = &c.shards[r.shard];
    let base = shard.header.data_start() + c.entry(r).begin;
    move |x: std::ops::Range<usize>| shard.release(base + x.start..base + x.end)
}

fn to_change(m: &sketch::Measured, with_direction: bool) -> Change {
    let s = &m.sums;
    let rank = m.slices.iter().map(|r| r.rank).max().unwrap_or(0);
    let rank_exact = m.slices.iter().all(|r| r.exact);
    let alignment = if with_direction { m.slices.iter().filter_map(|r| r.alignment).reduce(f64::min) } else { None };
    Change {
        max_abs: s.max_abs,
        frobenius: s.ss_dw.sqrt(),
        rel_frobenius: (s.ss_a > 0.0).then(|| (s.ss_dw / s.ss_a).sqrt()),
        rank,
        rank_exact,
        slices: m.slices.clone(),
        alignment,
        projection_ratio: (with_direction && s.proj_a > 0.0).then(|| (s.proj_b / s.proj_a).sqrt()),
    }
}

/// Differences between two config.json objects: nested objects present on both sides are compared
/// key by key (dotted keys), anything else as a whole value. A's key order, then B's new keys.
pub fn config_changes(a: &Map<String, Value>, b: &Map<String, Value>) -> Vec<ConfigChange> {
    let mut out = Vec::new();
    compare_objects("", a, b, &mut out);
    out
}

fn compare_objects(prefix: &str, a: &Map<String, Value>, b: &Map<String, Value>, out: &mut Vec<ConfigChange>) {
    let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    for (k, va) in a {
        match (va, b.get(k)) {
            (Value::Object(oa), Some(Value::Object(ob))) => compare_objects(&key(k), oa, ob, out),
            (_, Some(vb)) if vb == va => {}
            (_, vb) => out.push(ConfigChange { key: key(k), a: Some(va.clone()), b: vb.cloned() }),
        }
    }
    for (k, vb) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
        out.push(ConfigChange { key: key(k), a: None, b: Some(vb.clone()) });
    }
}

/// Other files (tokenizer, chat template, generation config, a manifest, ...) on either side,
/// compared byte for byte. config.json is compared key by key instead.
fn file_changes(a: &Checkpoint, b: &Checkpoint) -> Result<FileChanges> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: checkpoint::Error| match e {
            checkpoint::Error::Io { path, cause } => Error::Io { path, cause },
            other => Error::Io { path: path.clone(), cause: std::io::Error::other(other.to_string()) },
        }
    };
    let names = |c: &Checkpoint| -> Result<BTreeMap<String, PathBuf>> {
        Ok(c.other_files()
            .map_err(io(&c.dir))?
            .into_iter()
            .filter(|p| p != Path::new("config.json"))
            .map(|p| (p.to_string_lossy().into_owned(), p))
            .collect())
    };
    let (fa, fb) = (names(a)?, names(b)?);
    let mut out = FileChanges::default();
    for (name, rel) in &fa {
        if !fb.contains_key(name) {
            out.only_in_a.push(name.clone());
        } else if !same_bytes(&a.dir.join(rel), &b.dir.join(rel))? {
            out.changed.push(name.clone());
        }
    }
    out.only_in_b = fb.keys().filter(|n| !fa.contains_key(*n)).cloned().collect();
    Ok(out)
}

/// Streams two files and compares them (a model directory may hold very large extra files).
fn same_bytes(x: &Path, y: &Path) -> Result<bool> {
    let open = |p: &Path| File::open(p).map_err(|cause| Error::Io { path: p.to_path_buf(), cause });
    let (mut fx, mut fy) = (open(x)?, open(y)?);
    let len =
        |f: &File, p: &Path| f.metadata().map(|m| m.len()).map_err(|cause| Error::Io { path: p.to_path_buf(), cause });
    if len(&fx, x)? != len(&fy, y)? {
        return Ok(false);
    }
    let (mut bx, mut by) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fx, &mut bx).map_err(|cause| Error::Io { path: x.to_path_buf(), cause })?;
        let m = read_full(&mut fy, &mut by).map_err(|cause| Error::Io { path: y.to_path_buf(), cause })?;
        if n != m || bx[..n] != by[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A rank as reported: exact, or "more than [`MAX_EXACT_RANK`]".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank {
    pub value: usize,
    pub exact: bool,
}

/// One summary line: the tensors of one kind.
#[derive(Clone, Debug, PartialEq)]
pub struct KindSummary {
    pub kind: String,
    pub tensors: usize,
    /// How many tensors have each status (only statuses present), in [`Status::ALL`] order.
    pub counts: Vec<(Status, usize)>,
    /// Largest max `|dW|` over the changed tensors.
    pub max_abs: Option<f64>,
    /// Smallest and largest relative Frobenius norm of the changes.
    pub rel_frobenius: Option<(f64, f64)>,
    /// How many changed tensors have each rank.
    pub ranks: BTreeMap<Rank, usize>,
    pub alignment_min: Option<f64>,
    pub projection_ratio_max: Option<f64>,
    /// Largest `||d̂ᵀW_B|| / ||W_B||_F` of B's writers of this kind.
    pub orthogonality_max: Option<f64>,
}

/// One [`KindSummary`] per kind present, writers first.
pub fn summarize(report: &Report) -> Vec<KindSummary> {
    let mut order: Vec<((usize, String), String)> = Vec::new();
    let mut by_kind: HashMap<String, KindSummary> = HashMap::new();
    for t in &report.tensors {
        let kind = t.kind();
        let s = by_kind.entry(kind.clone()).or_insert_with(|| {
            order.push((kind_order(&t.role), kind.clone()));
            KindSummary {
                kind: kind.clone(),
                tensors: 0,
                counts: Vec::new(),
                max_abs: None,
                rel_frobenius: None,
                ranks: BTreeMap::new(),
                alignment_min: None,
                projection_ratio_max: None,
                orthogonality_max: None,
            }
        });
        s.tensors += 1;
        match s.counts.iter_mut().find(|(st, _)| *st == t.status) {
            Some((_, n)) => *n += 1,
            None => {
                s.counts.push((t.status, 1));
                s.counts.sort_by_key(|(st, _)| Status::ALL.iter().position(|x| x == st));
            }
        }
        if let Some(c) = &t.change {
            s.max_abs = Some(s.max_abs.map_or(c.max_abs, |m| m.max(c.max_abs)));
            if let Some(r) = c.rel_frobenius {
                s.rel_frobenius = Some(s.rel_frobenius.map_or((r, r), |(lo, hi)| (lo.min(r), hi.max(r))));
            }
            *s.ranks.entry(Rank { value: c.rank, exact: c.rank_exact }).or_default() += 1;
            if let Some(al) = c.alignment {
                s.alignment_min = Some(s.alignment_min.map_or(al, |m| m.min(al)));
            }
            if let Some(p) = c.projection_ratio {
                s.projection_ratio_max = Some(s.projection_ratio_max.map_or(p, |m| m.max(p)));
            }
        }
        if let Some(o) = t.orthogonality {
            s.orthogonality_max = Some(s.orthogonality_max.map_or(o, |m| m.max(o)));
        }
    }
    order.sort();
    order.into_iter().map(|(_, k)| by_kind.remove(&k).expect("every kind was inserted")).collect()
}

/// The `--expect-orthogonal` gate: every residual writer of B must keep
/// `||d̂ᵀW|| / ||W||_F <= tolerance`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub tolerance: f64,
    /// Residual writers of B checked.
    pub writers: usize,
    /// The largest ratio seen (NaN counts as a failure and is not part of it).
    pub max: f64,
    /// Writers above the tolerance (or not measurable: `None`), in report order.
    pub failures: Vec<(String, Option<f64>)>,
}

impl Gate {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

pub fn gate(report: &Report, tolerance: f64) -> Gate {
    let mut g = Gate { tolerance, writers: 0, max: 0.0, failures: Vec::new() };
    for t in report.tensors.iter().filter(|t| t.is_b_writer()) {
        g.writers += 1;
        match t.orthogonality {
            Some(v) if v <= tolerance => g.max = g.max.max(v),
            Some(v) => {
                if !v.is_nan() {
                    g.max = g.max.max(v);
                }
                g.failures.push((t.name.clone(), Some(v)));
            }
            None => g.failures.push((t.name.clone(), None)),
        }
    }
    g
}

#[cfg(test)]
mod tests;
