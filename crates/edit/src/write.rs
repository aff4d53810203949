//! The streaming writer: carries out a [`Plan`] into a new model directory.
//!
//! Every output shard has the input's file name, tensor names, order, shapes, dtypes and data
//! offsets; only its header grows (the input `__metadata__` plus `abliterate_version` and
//! `abliterate_direction_sha256`) and, when untying, the original embedding is appended as
//! `lm_head.weight` to the shard that holds the embedding. The data section is the input's,
//! byte for byte (gaps included), with the edited tensors' bytes replaced: unchanged bytes are
//! copied, never decoded.
//!
//! Memory is bounded whatever the checkpoint size: input is read with positioned reads in chunks
//! of whole rows (never through a memory map, whose touched pages would count as resident), edited
//! chunks are computed in parallel (rayon) and handed in order through a bounded channel to one
//! writer thread that hashes and writes them. A second thread hashes the input files. The output
//! goes to a temporary directory beside OUT, every file is fsynced, and the directory is renamed
//! into place only when complete; any failure removes it. No input file is opened for writing.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};

use checkpoint::{Checkpoint, INDEX_FILE, TensorEntry, safetensors};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::direction::hex;
use crate::kernel::{self, View};
use crate::manifest::{self, FileRecord, Ledger, ManifestParts, Report};
use crate::output::OutputTarget;
use crate::plan::{Plan, Tie};
use crate::{Direction, Error, Result};

/// Bytes per chunk of input read or output handed to the writer.
const CHUNK: usize = 8 << 20;
/// Chunks that may wait between the compute side and the writer.
const DEPTH: usize = 4;
/// The manifest written into OUT.
pub const MANIFEST: &str = "abliterate.json";

/// How to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Replace an existing OUT (only once the new one is complete).
    pub force: bool,
}

/// Progress of a write, in output bytes. Called from several threads.
pub trait Progress: Sync {
    fn start(&self, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}

/// An output file: written sequentially, then made durable.
pub(crate) trait OutFile: Write + Send {
    fn finish(&mut self) -> io::Result<()>;
}

impl OutFile for File {
    fn finish(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// Creates an output file (a test can inject one that fails).
pub(crate) type Create = dyn Fn(&Path) -> io::Result<Box<dyn OutFile>> + Sync;

fn create_file(path: &Path) -> io::Result<Box<dyn OutFile>> {
    Ok(Box::new(File::options().write(true).create_new(true).open(path)?))
}

/// Writes the edited checkpoint to `out` and returns what was done. On error nothing is left at
/// `out` (an existing `out` replaced with `--force` is kept) and no input has been modified.
pub fn write(
    ckpt: &Checkpoint,
    plan: &Plan,
    direction: &Direction,
    out: &Path,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    write_with(ckpt, plan, direction, out, opts, progress, &create_file)
}

/// A file of the model directory other than the weights, and whether it is carried over.
struct OtherFile {
    rel: PathBuf,
    copy: bool,
}

/// Weights in another format (or stale shards) are not carried over: they would hold the
/// unedited model beside the edited one.
fn is_foreign_weights(rel: &Path) -> bool {
    let name = rel.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".pkl", ".onnx"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

fn rel_string(rel: &Path) -> String {
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

struct Ctx<'a> {
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    units: Vec<Arc<[f64]>>,
    inputs: Vec<File>,
    create: &'a Create,
    progress: &'a dyn Progress,
    target: &'a OutputTarget,
    temp: &'a Path,
    need: u64,
}

impl Ctx<'_> {
    fn write_error(&self, rel: &str, e: io::Error) -> Error {
        let full = e.kind() == io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122));
        if full {
            Error::DiskFull { dir: self.target.out.clone(), file: rel.to_string(), need: self.need }
        } else {
            Error::Io { path: self.target.out.join(rel), cause: e }
        }
    }

    fn read_error(&self, shard: usize, e: io::Error) -> Error {
        Error::Io { path: self.ckpt.shards[shard].path.clone(), cause: e }
    }

    /// Writes a small file whole.
    fn write_small(&self, rel: &str, bytes: &[u8]) -> Result<FileRecord> {
        let mut w = HashingFile::new((self.create)(&self.temp.join(rel)).map_err(|e| self.write_error(rel, e))?);
        w.write_all(bytes).map_err(|e| self.write_error(rel, e))?;
        self.progress.advance(bytes.len() as u64);
        let (sha256, bytes) = w.finish().map_err(|e| self.write_error(rel, e))?;
        Ok(FileRecord { path: rel.to_string(), sha256, bytes })
    }

    /// Copies a file of the model directory.
    fn copy_file(&self, rel: &str) -> Result<FileRecord> {
        let src = self.ckpt.dir.join(rel);
        let mut input = File::open(&src).map_err(|source| Error::Io { path: src.clone(), cause: source })?;
        let dst = self.temp.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| self.write_error(rel, e))?;
        }
        let mut w = HashingFile::new((self.create)(&dst).map_err(|e| self.write_error(rel, e))?);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(|source| Error::Io { path: src.clone(), cause: source })?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(|e| self.write_error(rel, e))?;
            self.progress.advance(n as u64);
        }
        let (sha256, bytes) = w.finish().map_err(|e| self.write_error(rel, e))?;
        Ok(FileRecord { path: rel.to_string(), sha256, bytes })
    }
}

/// A writer that hashes what it writes.
struct HashingFile {
    inner: Box<dyn OutFile>,
    hasher: Sha256,
    len: u64,
}

impl HashingFile {
    fn new(inner: Box<dyn OutFile>) -> HashingFile {
        HashingFile { inner, hasher: Sha256::new(), len: 0 }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> io::Result<(String, u64)> {
        self.inner.flush()?;
        self.inner.finish()?;
        Ok((hex(&self.hasher.finalize()), self.len))
    }
}

/// One stretch of an output shard's data section.
enum Segment {
    /// Bytes `range` (absolute file offsets) of input shard `shard`, copied as they are.
    Copy { shard: usize, range: std::ops::Range<u64> },
    /// Edit number `index` of the plan.
    Edit(usize),
}

/// The output layout of one shard.
struct ShardLayout {
    header: Vec<u8>,
    segments: Vec<Segment>,
    len: u64,
}

fn shard_layout(ckpt: &Checkpoint, plan: &Plan, si: usize, direction_sha: &str) -> ShardLayout {
    let shard = &ckpt.shards[si];
    let data_start = shard.header.data_start() as u64;
    let data_len = shard.len() - data_start;
    let mut metadata = shard.metadata().cloned().unwrap_or_else(Map::new);
    metadata.insert("abliterate_version".into(), Value::String(env!("CARGO_PKG_VERSION").into()));
    metadata.insert("abliterate_direction_sha256".into(), Value::String(direction_sha.into()));
    let mut tensors: Vec<TensorEntry> = shard.header.tensors.clone();
    let mut segments = Vec::new();
    let mut edits: Vec<(usize, usize)> = plan
        .edits
        .iter()
        .enumerate()
        .filter(|(_, e)| e.tensor.shard == si)
        .map(|(i, e)| (ckpt.entry(e.tensor).begin, i))
        .collect();
    edits.sort();
    let mut cursor = data_start;
    for (begin, i) in edits {
        let t = ckpt.entry(plan.edits[i].tensor);
        let (b, e) = (data_start + begin as u64, data_start + t.end as u64);
        if b > cursor {
            segments.push(Segment::Copy { shard: si, range: cursor..b });
        }
        segments.push(Segment::Edit(i));
        cursor = e;
    }
    if shard.len() > cursor {
        segments.push(Segment::Copy { shard: si, range: cursor..shard.len() });
    }
    let mut end = data_len as usize;
    for a in plan.added.iter().filter(|a| a.file == shard.file_name) {
        let src = ckpt.entry(a.source);
        let src_start = ckpt.shards[a.source.shard].header.data_start() as u64;
        tensors.push(TensorEntry {
            name: a.name.clone(),
            dtype: a.dtype,
            shape: a.shape.clone(),
            begin: end,
            end: end + src.nbytes(),
        });
        end += src.nbytes();
        segments.push(Segment::Copy {
            shard: a.source.shard,
            range: src_start + src.begin as u64..src_start + src.end as u64,
        });
    }
    let header = safetensors::write_header(Some(&metadata), &tensors);
    let len = header.len() as u64 + end as u64;
    ShardLayout { header, segments, len }
}

/// Buffers recycled between the compute side and the writer, so memory stays bounded.
struct Pool {
    back: Receiver<Vec<u8>>,
}

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.back.try_recv().unwrap_or_default();
        b.clear();
        b.resize(len, 0);
        b
    }
}

/// Streams one shard: the producer (this thread, with rayon for the math) sends chunks in order to
/// a writer thread through a bounded channel.
fn stream_shard(ctx: &Ctx, si: usize, layout: ShardLayout) -> Result<(FileRecord, Vec<Ledger>)> {
    let rel = ctx.ckpt.shards[si].file_name.clone();
    let path = ctx.temp.join(&rel);
    let file = (ctx.create)(&path).map_err(|e| ctx.write_error(&rel, e))?;
    let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
    let (back_tx, back_rx) = channel::<Vec<u8>>();
    let pool = Pool { back: back_rx };
    std::thread::scope(|s| {
        let progress = ctx.progress;
        let writer = s.spawn(move || -> io::Result<(String, u64)> {
            let mut w = HashingFile::new(file);
            for buf in rx {
                w.write_all(&buf)?;
                progress.advance(buf.len() as u64);
                let _ = back_tx.send(buf);
            }
            w.finish()
        });
        let produced = produce(ctx, &layout, &tx, &pool);
        drop(tx);
        let written = writer.join().expect("the writer thread does not panic");
        match (produced, written) {
            (Ok(ledger), Ok((sha256, bytes))) => Ok((FileRecord { path: rel.clone(), sha256, bytes }, ledger)),
            // A failed write stops the producer (its send fails), so the writer's error comes first.
            (_, Err(e)) => Err(ctx.write_error(&rel, e)),
            (Err(e), Ok(_)) => Err(e),
        }
    })
}

/// The writer hung up (it failed); its error is reported by the caller.
struct WriterGone;

fn produce(ctx: &Ctx, layout: &ShardLayout, tx: &SyncSender<Vec<u8>>, pool: &Pool) -> Result<Vec<Ledger>> {
    let send = |b: Vec<u8>| tx.send(b).map_err(|_| WriterGone);
    let mut ledger = Vec::new();
    let mut header = pool.take(0);
    header.extend_from_slice(&layout.header);
    if send(header).is_err() {
        return Ok(ledger);
    }
    for seg in &layout.segments {
        let step = match seg {
            Segment::Copy { shard, range } => copy_range(ctx, *shard, range.clone(), pool, &send),
            Segment::Edit(i) => edit_tensor(ctx, *i, pool, &send).map(|l| l.map(|l| ledger.push(l))),
        };
        match step? {
            Ok(()) => {}
            Err(WriterGone) => break,
        }
    }
    Ok(ledger)
}

type Sent = std::result::Result<(), WriterGone>;

fn copy_range(
    ctx: &Ctx,
    shard: usize,
    range: std::ops::Range<u64>,
    pool: &Pool,
    send: &dyn Fn(Vec<u8>) -> Sent,
) -> Result<Sent> {
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(CHUNK as u64) as usize;
        let mut buf = pool.take(n);
        ctx.inputs[shard].read_exact_at(&mut buf, off).map_err(|e| ctx.read_error(shard, e))?;
        if let Err(g) = send(buf) {
            return Ok(Err(g));
        }
        off += n as u64;
    }
    Ok(Ok(()))
}

/// Two passes over one tensor, chunk by chunk: the projection `c` (and `||W||_F`), then the
/// rewrite, whose stored bytes give `|uᵀW'|` before they go to the writer.
fn edit_tensor(
    ctx: &Ctx,
    i: usize,
    pool: &Pool,
    send: &dyn Fn(Vec<u8>) -> Sent,
) -> Result<std::result::Result<Ledger, WriterGone>> {
    let e = &ctx.plan.edits[i];
    let unit = &ctx.units[i];
    let t = ctx.ckpt.entry(e.tensor);
    let shard = e.tensor.shard;
    let size = t.dtype.float_size().expect("plan() edits only float tensors");
    let view = View::new(e.writer.view(&t.shape));
    let row_bytes = view.inner * size;
    let rows_per_chunk = CHUNK.checked_div(row_bytes).unwrap_or(view.rows()).max(1);
    let start = ctx.ckpt.shards[shard].header.data_start() as u64 + t.begin as u64;
    let chunks = || (0..view.rows()).step_by(rows_per_chunk).map(move |r0| r0..(r0 + rows_per_chunk).min(view.rows()));
    let mut input = Vec::new();
    let read = |rows: &std::ops::Range<usize>, input: &mut Vec<u8>| -> Result<()> {
        input.clear();
        input.resize(rows.len() * row_bytes, 0);
        let off = start + (rows.start * row_bytes) as u64;
        ctx.inputs[shard].read_exact_at(input, off).map_err(|e| ctx.read_error(shard, e))
    };
    let mut c = vec![0f64; view.columns()];
    let mut sq = vec![0f64; view.columns()];
    for rows in chunks() {
        read(&rows, &mut input)?;
        kernel::accumulate(t.dtype, view, rows, &input, unit, &mut c, Some(&mut sq));
    }
    let mut c_after = vec![0f64; view.columns()];
    let mut max_change = 0f64;
    for rows in chunks() {
        read(&rows, &mut input)?;
        let mut out = pool.take(input.len());
        let m = kernel::rewrite(t.dtype, view, rows.clone(), &input, unit, &c, e.scale, &mut out);
        max_change = max_change.max(m);
        kernel::accumulate(t.dtype, view, rows, &out, unit, &mut c_after, None);
        if let Err(g) = send(out) {
            return Ok(Err(g));
        }
    }
    Ok(Ok(ctx_ledger(e, t.dtype, &c, &c_after, &sq, max_change)))
}

fn ctx_ledger(
    e: &crate::TensorEdit,
    dtype: checkpoint::Dtype,
    c: &[f64],
    c_after: &[f64],
    sq: &[f64],
    max_change: f64,
) -> Ledger {
    Ledger {
        name: e.name.clone(),
        file: e.file.clone(),
        kind: e.kind_label(),
        layer: e.writer.layer,
        expert: e.writer.expert,
        dtype: dtype.as_str().to_string(),
        shape: e.shape.clone(),
        against: e.against.label(),
        scale: e.scale,
        proj_before: kernel::norm(c),
        proj_after: kernel::norm(c_after),
        frobenius: sq.iter().sum::<f64>().sqrt(),
        max_change,
    }
}

/// Hashes the input files on a thread of its own; stops early when `cancel` is set.
fn hash_inputs(files: &[(String, PathBuf)], cancel: &AtomicBool) -> Result<Vec<FileRecord>> {
    let mut out = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; 4 << 20];
    for (rel, path) in files {
        let io = |source| Error::Io { path: path.clone(), cause: source };
        let mut f = File::open(path).map_err(io)?;
        let mut h = Sha256::new();
        let mut len = 0u64;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            len += n as u64;
        }
        out.push(FileRecord { path: rel.clone(), sha256: hex(&h.finalize()), bytes: len });
    }
    Ok(out)
}

/// config.json with `tie_word_embeddings: false` where transformers reads it (the top level,
/// and `text_config` of multimodal Gemma 3), keeping every other key and the key order.
fn untied_config(ckpt: &Checkpoint) -> Vec<u8> {
    let mut file = ckpt.config.file.clone();
    file.insert("tie_word_embeddings".into(), Value::Bool(false));
    if let Some(Value::Object(text)) = file.get_mut("text_config") {
        text.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    let mut out = serde_json::to_vec_pretty(&Value::Object(file)).expect("JSON values serialize");
    out.push(b'\n');
    out
}

/// The index with the added tensors (and `metadata.total_size` grown by their bytes).
fn updated_index(index: &Map<String, Value>, plan: &Plan) -> Vec<u8> {
    let mut index = index.clone();
    if let Some(Value::Object(map)) = index.get_mut("weight_map") {
        for a in &plan.added {
            map.insert(a.name.clone(), Value::String(a.file.clone()));
        }
    }
    if let Some(Value::Object(meta)) = index.get_mut("metadata")
        && let Some(total) = meta.get("total_size").and_then(Value::as_u64)
    {
        meta.insert("total_size".into(), Value::from(total + plan.added_bytes()));
    }
    let mut out = serde_json::to_vec_pretty(&Value::Object(index)).expect("JSON values serialize");
    out.push(b'\n');
    out
}

pub(crate) fn write_with(
    ckpt: &Checkpoint,
    plan: &Plan,
    direction: &Direction,
    out: &Path,
    opts: &WriteOptions,
    progress: &dyn Progress,
    create: &Create,
) -> Result<Report> {
    let units = plan.units(ckpt, direction)?;
    let others: Vec<OtherFile> = ckpt
        .other_files()?
        .into_iter()
        .filter(|rel| rel.as_path() != Path::new(MANIFEST))
        .map(|rel| OtherFile { copy: !is_foreign_weights(&rel), rel })
        .collect();
    // Every input file we read, sorted by relative path.
    let mut input_files: Vec<(String, PathBuf)> =
        ckpt.shards.iter().map(|s| (s.file_name.clone(), s.path.clone())).collect();
    if ckpt.index.is_some() {
        input_files.push((INDEX_FILE.to_string(), ckpt.dir.join(INDEX_FILE)));
    }
    for o in others.iter().filter(|o| o.copy) {
        input_files.push((rel_string(&o.rel), ckpt.dir.join(&o.rel)));
    }
    input_files.sort();
    let abs_inputs: Vec<PathBuf> = input_files.iter().map(|(_, p)| p.clone()).collect();
    let target = OutputTarget::check(&ckpt.dir, &abs_inputs, out, opts.force)?;

    let layouts: Vec<ShardLayout> =
        (0..ckpt.shards.len()).map(|si| shard_layout(ckpt, plan, si, &direction.sha256)).collect();
    let untie = plan.tie == Tie::Untie;
    let config_bytes = if untie { Some(untied_config(ckpt)) } else { None };
    let index_bytes = match (&ckpt.index, untie) {
        (Some(index), true) => Some(updated_index(index, plan)),
        _ => None,
    };
    let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let need = layouts.iter().map(|l| l.len).sum::<u64>()
        + index_bytes
            .as_ref()
            .map(|b| b.len() as u64)
            .unwrap_or_else(|| if ckpt.index.is_some() { file_len(&ckpt.dir.join(INDEX_FILE)) } else { 0 })
        + others.iter().filter(|o| o.copy).map(|o| file_len(&ckpt.dir.join(&o.rel))).sum::<u64>();
    progress.start(need);

    let inputs = ckpt
        .shards
        .iter()
        .map(|s| File::open(&s.path).map_err(|source| Error::Io { path: s.path.clone(), cause: source }))
        .collect::<Result<Vec<_>>>()?;
    let temp = target.create_temp()?;
    let ctx = Ctx { ckpt, plan, units, inputs, create, progress, target: &target, temp: temp.path(), need };
    let cancel = AtomicBool::new(false);
    let (written, hashed) = std::thread::scope(|s| {
        let hasher = s.spawn(|| hash_inputs(&input_files, &cancel));
        let written = write_all(&ctx, layouts, &others, config_bytes.as_deref(), index_bytes.as_deref());
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (written, hasher.join().expect("the hashing thread does not panic"))
    });
    let (mut outputs, ledger) = written?;
    let inputs = hashed?;

    let previous = std::fs::read(ckpt.dir.join(MANIFEST)).ok().map(|b| {
        serde_json::from_slice::<Value>(&b).unwrap_or_else(|_| Value::String(crate::direction::sha256_hex(&b)))
    });
    outputs.sort_by(|a, b| a.path.cmp(&b.path));
    let not_copied: Vec<String> = others.iter().filter(|o| !o.copy).map(|o| rel_string(&o.rel)).collect();
    let manifest = manifest::build(ManifestParts {
        plan,
        direction,
        model: &ckpt.dir.display().to_string(),
        ledger: &ledger,
        inputs: &inputs,
        outputs: &outputs,
        not_copied: &not_copied,
        previous,
    });
    let mut text = serde_json::to_vec_pretty(&manifest).expect("JSON values serialize");
    text.push(b'\n');
    ctx.write_small(MANIFEST, &text)?;
    let bytes_written = outputs.iter().map(|o| o.bytes).sum();
    drop(ctx);
    target.commit(temp)?;
    Ok(Report { ledger, inputs, outputs, manifest, bytes_written, not_copied })
}

/// Writes every output file into the temporary directory.
fn write_all(
    ctx: &Ctx,
    layouts: Vec<ShardLayout>,
    others: &[OtherFile],
    config: Option<&[u8]>,
    index: Option<&[u8]>,
) -> Result<(Vec<FileRecord>, Vec<Ledger>)> {
    let mut outputs = Vec::new();
    let mut ledger_by_edit: HashMap<String, Ledger> = HashMap::new();
    for (si, layout) in layouts.into_iter().enumerate() {
        let (record, ledger) = stream_shard(ctx, si, layout)?;
        outputs.push(record);
        for l in ledger {
            ledger_by_edit.insert(l.name.clone(), l);
        }
    }
    if ctx.ckpt.index.is_some() {
        outputs.push(match index {
            Some(bytes) => ctx.write_small(INDEX_FILE, bytes)?,
            None => ctx.copy_file(INDEX_FILE)?,
        });
    }
    for o in others.iter().filter(|o| o.copy) {
        let rel = rel_string(&o.rel);
        outputs.push(match (rel.as_str(), config) {
            ("config.json", Some(bytes)) => ctx.write_small(&rel, bytes)?,
            _ => ctx.copy_file(&rel)?,
        });
    }
    // The ledger in plan order.
    let ledger = ctx.plan.edits.iter().filter_map(|e| ledger_by_edit.remove(&e.name)).collect();
    Ok((outputs, ledger))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with ENOSPC once `budget` bytes have been written in total (a full disk).
    struct FullDisk {
        file: File,
        budget: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let left = self.budget.load(Ordering::SeqCst);
            if left == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            let n = (buf.len() as u64).min(left) as usize;
            self.budget.fetch_sub(n as u64, Ordering::SeqCst);
            self.file.write(&buf[..n])
        }
        fn flush(&mut self) -> io::Result<()> {
            self.file.flush()
        }
    }

    impl OutFile for FullDisk {
        fn finish(&mut self) -> io::Result<()> {
            self.file.sync_all()
        }
    }

    #[test]
    fn is_foreign_weights_skips_other_formats() {
        assert!(is_foreign_weights(Path::new("consolidated.safetensors")));
        assert!(is_foreign_weights(Path::new("pytorch_model.bin")));
        assert!(!is_foreign_weights(Path::new("tokenizer.json")));
        assert!(!is_foreign_weights(Path::new("tokenizer.model")));
    }

    pub(crate) fn full_disk(budget: u64) -> impl Fn(&Path) -> io::Result<Box<dyn OutFile>> + Sync {
        let budget = Arc::new(std::sync::atomic::AtomicU64::new(budget));
        move |p: &Path| -> io::Result<Box<dyn OutFile>> {
            Ok(Box::new(FullDisk { file: File::create_new(p)?, budget: budget.clone() }))
        }
    }

    #[test]
    fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let model = crate::synth::llama(tmp.path(), checkpoint::Dtype::BF16, true);
        let dir = Direction::load(&crate::synth::direction_file(tmp.path(), 64), 64).unwrap();
        let ckpt = Checkpoint::open(&model).unwrap();
        let plan = crate::plan(&ckpt, &crate::Options::default()).unwrap();
        let out = tmp.path().join("out");
        let before = crate::synth::hash_dir(&model);
        for budget in [0u64, 100, 20_000] {
            let e = write_with(&ckpt, &plan, &dir, &out, &WriteOptions::default(), &NoProgress, &full_disk(budget))
                .unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with("disk full while writing `model.safetensors` (the edited model needs "), "{msg}");
            assert!(msg.ends_with(&format!(
                " in `{}`); nothing was left behind: the temporary output was removed. Free some space or choose another -o",
                out.display()
            )));
            assert!(!out.exists());
            let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert!(left.iter().all(|n| !n.to_string_lossy().contains("abliterate-tmp")), "{left:?}");
        }
        assert_eq!(crate::synth::hash_dir(&model), before);
    }
}
