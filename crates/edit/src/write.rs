//! The streaming writer: carries out a [`Plan`] into a new model directory.
//!
//! Every output shard has the input's file name, tensor names, order, shapes, dtypes and data
//! offsets; only its header grows (the input `__metadata__` plus `abliterate_version` and
//! `abliterate_direction_sha256`) and, when untying, the original embedding is appended as
//! `lm_head.weight` to the shard that holds the embedding. The data section is the input's,
//! byte for byte (gaps included), with the edited tensors' bytes replaced: unchanged bytes are
//! copied, never decoded.
//!
//! Memory is bounded whatever the checkpoint size: each input shard is read once, in order, with
//! positioned reads in 8 MB chunks of whole rows (never through a memory map, whose touched pages
//! would count as resident); edited chunks are computed in parallel (rayon); chunks go through
//! bounded channels to three threads: the writer (direct I/O on Linux, so the page cache does not
//! grow either), the output hasher and the input hasher. Buffers are recycled. The output goes to
//! a temporary directory beside OUT, every file is fsynced, and the directory is renamed into place
//! only when complete; any failure removes it. No input file is opened for writing.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};

use checkpoint::{Checkpoint, INDEX_FILE, TensorEntry, safetensors};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::kernel::{self, View};
use crate::manifest::{self, FileRecord, Ledger, ManifestParts, Report};
use crate::output::OutputTarget;
use crate::plan::{Plan, Tie};
use crate::{Basis, Direction, Directions, Error, Result};
use direction::hex;

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
    /// Bytes `begin..end` are written: the disk may start storing them (a hint).
    fn start_writeback(&mut self, _begin: u64, _end: u64) {}
    fn finish(&mut self) -> io::Result<()>;
}

impl OutFile for File {
    #[cfg(target_os = "linux")]
    fn start_writeback(&mut self, begin: u64, end: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor we own; it only starts asynchronous
        // writeback of already written pages, so the final fsync has less left to wait for
        // (the disk works while we compute). Failure is harmless: fsync still runs.
        unsafe {
            libc::sync_file_range(
                self.as_raw_fd(),
                begin as libc::off64_t,
                (end - begin) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// Written bytes between writeback hints.
const WRITEBACK: u64 = 32 << 20;

/// Creates an output file; `streamed` marks a large shard written in big sequential blocks
/// (a test can inject a file that fails).
pub(crate) type Create = dyn Fn(&Path, bool) -> io::Result<Box<dyn OutFile>> + Sync;

fn create_file(path: &Path, streamed: bool) -> io::Result<Box<dyn OutFile>> {
    // Direct I/O is Linux's O_DIRECT; elsewhere every file goes through the page cache.
    #[cfg(target_os = "linux")]
    if streamed {
        use std::os::unix::fs::OpenOptionsExt;
        match File::options().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok(Box::new(DirectFile::new(file))),
            // No direct I/O on this filesystem: the page cache it is.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Box::new(File::options().write(true).create_new(true).open(path)?))
}

/// Bytes staged per direct write (a multiple of any logical block size).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const STAGE: usize = 8 << 20;
/// Alignment of direct I/O buffers, offsets and lengths.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const BLOCK: usize = 4096;

/// A shard written with direct I/O (`O_DIRECT`): bytes are staged in an aligned buffer and written
/// in whole blocks, bypassing the page cache. On this kind of streaming write the page cache costs
/// more CPU than the copy itself, and the final fsync has nothing left to flush. The last partial
/// block is written padded and the file then truncated to its length. If the filesystem refuses a
/// direct write, the file falls back to ordinary writes.
#[cfg(target_os = "linux")]
struct DirectFile {
    file: File,
    buf: Vec<u8>,
    /// Offset of the aligned stage in `buf`.
    start: usize,
    fill: usize,
    written: u64,
    direct: bool,
}

#[cfg(target_os = "linux")]
impl DirectFile {
    fn new(file: File) -> DirectFile {
        let buf = vec![0u8; STAGE + BLOCK];
        let start = buf.as_ptr().align_offset(BLOCK);
        DirectFile { file, buf, start, fill: 0, written: 0, direct: true }
    }

    fn write_stage(&mut self, len: usize) -> io::Result<()> {
        let range = self.start..self.start + len;
        match self.file.write_all_at(&self.buf[range.clone()], self.written) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.buffered()?;
                self.file.write_all_at(&self.buf[range], self.written)
            }
            other => other,
        }
    }

    /// Turns direct I/O off for this file.
    fn buffered(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, changing only its status flags.
        let ok = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) == 0
        };
        self.direct = false;
        if ok { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

#[cfg(target_os = "linux")]
impl Write for DirectFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(STAGE - self.fill);
        self.buf[self.start + self.fill..self.start + self.fill + n].copy_from_slice(&data[..n]);
        self.fill += n;
        if self.fill == STAGE {
            self.write_stage(STAGE)?;
            self.written += STAGE as u64;
            self.fill = 0;
        }
        Ok(n)
    }

    /// Whole blocks only go out when the stage is full or at [`OutFile::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(target_os = "linux")]
impl OutFile for DirectFile {
    fn finish(&mut self) -> io::Result<()> {
        if self.fill > 0 {
            let padded = if self.direct { self.fill.next_multiple_of(BLOCK) } else { self.fill };
            self.buf[self.start + self.fill..self.start + padded].fill(0);
            self.write_stage(padded)?;
            self.file.set_len(self.written + self.fill as u64)?;
            self.written += self.fill as u64;
            self.fill = 0;
        }
        self.file.sync_all()
    }
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
    let directions = Directions::single(direction.clone(), ckpt.config.num_hidden_layers);
    write_with(ckpt, plan, &directions, out, opts, progress, &create_file)
}

/// [`write`] for any [`Directions`]: a subspace, or one basis per layer (docs/variants.md).
pub fn write_directions(
    ckpt: &Checkpoint,
    plan: &Plan,
    directions: &Directions,
    out: &Path,
    opts: &WriteOptions,
    progress: &dyn Progress,
) -> Result<Report> {
    write_with(ckpt, plan, directions, out, opts, progress, &create_file)
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
    units: Vec<Arc<Basis>>,
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
        let mut w = HashingFile::new((self.create)(&self.temp.join(rel), false).map_err(|e| self.write_error(rel, e))?);
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
        let mut w = HashingFile::new((self.create)(&dst, false).map_err(|e| self.write_error(rel, e))?);
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
    /// Where the last writeback hint ended.
    synced: u64,
}

impl HashingFile {
    fn new(inner: Box<dyn OutFile>) -> HashingFile {
        HashingFile { inner, hasher: Sha256::new(), len: 0, synced: 0 }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        if self.len - self.synced >= WRITEBACK {
            self.inner.start_writeback(self.synced, self.len);
            self.synced = self.len;
        }
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
    /// `in_order`: these are the next bytes of the shard being streamed (and go to its input
    /// hash); not so for the appended untied head, a second copy of the embedding.
    Copy { shard: usize, range: std::ops::Range<u64>, in_order: bool },
    /// Edit number `index` of the plan.
    Edit(usize),
    /// Input bytes `own` of this shard (hashed, not written) replaced by bytes `from` of input
    /// shard `shard`, of the same length: a stored head replaced by the original embedding.
    Replace { own: std::ops::Range<u64>, shard: usize, from: std::ops::Range<u64> },
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
    let abs = |r: checkpoint::TensorRef| {
        let t = ckpt.entry(r);
        let start = ckpt.shards[r.shard].header.data_start() as u64;
        start + t.begin as u64..start + t.end as u64
    };
    // Rewritten stretches of this shard, in file order: edits, and stored tensors replaced whole.
    let mut rewritten: Vec<(std::ops::Range<u64>, Segment)> = plan
        .edits
        .iter()
        .enumerate()
        .filter(|(_, e)| e.tensor.shard == si)
        .map(|(i, e)| (abs(e.tensor), Segment::Edit(i)))
        .chain(plan.added.iter().filter_map(|a| {
            let r = a.replaces.filter(|r| r.shard == si)?;
            Some((abs(r), Segment::Replace { own: abs(r), shard: a.source.shard, from: abs(a.source) }))
        }))
        .collect();
    rewritten.sort_by_key(|(range, _)| range.start);
    let mut cursor = data_start;
    for (range, segment) in rewritten {
        if range.start > cursor {
            segments.push(Segment::Copy { shard: si, range: cursor..range.start, in_order: true });
        }
        segments.push(segment);
        cursor = range.end;
    }
    if shard.len() > cursor {
        segments.push(Segment::Copy { shard: si, range: cursor..shard.len(), in_order: true });
    }
    let mut end = data_len as usize;
    for a in plan.added.iter().filter(|a| a.file == shard.file_name && a.replaces.is_none()) {
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
            in_order: false,
        });
    }
    let header = safetensors::write_header(Some(&metadata), &tensors);
    let len = header.len() as u64 + end as u64;
    ShardLayout { header, segments, len }
}

/// A chunk of bytes on its way to the writer and/or the input hasher.
type Chunk = Arc<Vec<u8>>;

/// Buffers recycled from the consumers, so memory stays bounded and is not re-zeroed.
struct Pool {
    back: Receiver<Chunk>,
}

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        // A chunk comes back once per consumer; the last one to return it frees it for reuse.
        while let Ok(chunk) = self.back.try_recv() {
            if let Ok(mut v) = Arc::try_unwrap(chunk) {
                v.resize(len, 0);
                return v;
            }
        }
        vec![0u8; len]
    }
}

/// The consumers of a shard's chunks: the writer and the output hasher (output bytes, in order),
/// and the input hasher (every byte of the input shard, in order, read once by the producer).
struct Sinks<'a> {
    writer: &'a SyncSender<Chunk>,
    out_hasher: &'a SyncSender<Chunk>,
    hasher: &'a SyncSender<Chunk>,
}

/// The writer hung up (it failed); its error is reported by the caller.
struct WriterGone;

type Sent<T = ()> = std::result::Result<T, WriterGone>;

impl Sinks<'_> {
    fn write(&self, c: &Chunk) -> Sent {
        let _ = self.out_hasher.send(c.clone());
        self.writer.send(c.clone()).map_err(|_| WriterGone)
    }

    fn hash(&self, c: &Chunk) {
        // The hasher only stops when the producer does.
        let _ = self.hasher.send(c.clone());
    }
}

/// Hashes chunks in order; returns the hex digest and the byte count.
fn hash_stream(rx: Receiver<Chunk>, back: std::sync::mpsc::Sender<Chunk>) -> (String, u64) {
    let mut h = Sha256::new();
    let mut len = 0u64;
    for chunk in rx {
        h.update(&chunk[..]);
        len += chunk.len() as u64;
        let _ = back.send(chunk);
    }
    (hex(&h.finalize()), len)
}

/// Streams one shard. The producer (this thread, with rayon for the math) reads the input once,
/// in order, and sends chunks through bounded channels to a writer thread (which hashes and
/// writes the output) and a hasher thread (which hashes the input).
fn stream_shard(ctx: &Ctx, si: usize, layout: ShardLayout) -> Result<(FileRecord, FileRecord, Vec<Ledger>)> {
    let shard = &ctx.ckpt.shards[si];
    let rel = shard.file_name.clone();
    let path = ctx.temp.join(&rel);
    let file = (ctx.create)(&path, true).map_err(|e| ctx.write_error(&rel, e))?;
    let (to_writer, from_producer) = sync_channel::<Chunk>(DEPTH);
    let (to_out_hasher, out_hasher_rx) = sync_channel::<Chunk>(DEPTH);
    let (to_hasher, hasher_rx) = sync_channel::<Chunk>(DEPTH);
    let (back_tx, back_rx) = channel::<Chunk>();
    let pool = Pool { back: back_rx };
    std::thread::scope(|s| {
        let progress = ctx.progress;
        let (writer_back, out_back) = (back_tx.clone(), back_tx.clone());
        let writer = s.spawn(move || -> io::Result<u64> {
            let mut file = file;
            let mut len = 0u64;
            for chunk in from_producer {
                file.write_all(&chunk)?;
                len += chunk.len() as u64;
                progress.advance(chunk.len() as u64);
                let _ = writer_back.send(chunk);
            }
            file.flush()?;
            file.finish()?;
            Ok(len)
        });
        let out_hasher = s.spawn(move || hash_stream(out_hasher_rx, out_back));
        let hasher = s.spawn(move || hash_stream(hasher_rx, back_tx));
        let sinks = Sinks { writer: &to_writer, out_hasher: &to_out_hasher, hasher: &to_hasher };
        let produced = produce(ctx, si, &layout, &sinks, &pool);
        drop((to_writer, to_out_hasher, to_hasher));
        let written = writer.join().expect("the writer thread does not panic");
        let (out_sha, out_len) = out_hasher.join().expect("the hashing thread does not panic");
        let (in_sha, in_len) = hasher.join().expect("the hashing thread does not panic");
        match (produced, written) {
            (Ok(ledger), Ok(bytes)) => {
                // The producer reads every input byte exactly once, in order.
                assert_eq!(in_len, shard.len(), "the input hash covers `{rel}` whole");
                assert_eq!(out_len, bytes, "the output hash covers `{rel}` whole");
                let input = FileRecord { path: rel.clone(), sha256: in_sha, bytes: in_len };
                Ok((FileRecord { path: rel.clone(), sha256: out_sha, bytes }, input, ledger))
            }
            // A failed write stops the producer (its send fails), so the writer's error comes first.
            (_, Err(e)) => Err(ctx.write_error(&rel, e)),
            (Err(e), Ok(_)) => Err(e),
        }
    })
}

fn produce(ctx: &Ctx, si: usize, layout: &ShardLayout, sinks: &Sinks, pool: &Pool) -> Result<Vec<Ledger>> {
    let mut ledger = Vec::new();
    // The input's own header, for the input hash only.
    let data_start = ctx.ckpt.shards[si].header.data_start();
    let mut header_in = pool.take(data_start);
    ctx.inputs[si].read_exact_at(&mut header_in, 0).map_err(|e| ctx.read_error(si, e))?;
    sinks.hash(&Arc::new(header_in));
    let mut header_out = pool.take(layout.header.len());
    header_out.copy_from_slice(&layout.header);
    if sinks.write(&Arc::new(header_out)).is_err() {
        return Ok(ledger);
    }
    for seg in &layout.segments {
        let sent = match seg {
            Segment::Copy { shard, range, in_order } => copy_range(ctx, *shard, range.clone(), *in_order, sinks, pool)?,
            Segment::Edit(i) => edit_tensor(ctx, *i, sinks, pool)?.map(|l| ledger.push(l)),
            Segment::Replace { own, shard, from } => {
                hash_range(ctx, si, own.clone(), sinks, pool)?;
                copy_range(ctx, *shard, from.clone(), false, sinks, pool)?
            }
        };
        if sent.is_err() {
            break;
        }
    }
    Ok(ledger)
}

/// Copies input bytes `range` of `shard` to the output; `hash` says whether they are the next
/// bytes of the input shard being hashed (not so for the appended untied head).
fn copy_range(
    ctx: &Ctx,
    shard: usize,
    range: std::ops::Range<u64>,
    hash: bool,
    sinks: &Sinks,
    pool: &Pool,
) -> Result<Sent> {
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(CHUNK as u64) as usize;
        let mut buf = pool.take(n);
        ctx.inputs[shard].read_exact_at(&mut buf, off).map_err(|e| ctx.read_error(shard, e))?;
        let chunk = Arc::new(buf);
        if hash {
            sinks.hash(&chunk);
        }
        if let Err(g) = sinks.write(&chunk) {
            return Ok(Err(g));
        }
        off += n as u64;
    }
    Ok(Ok(()))
}

/// Reads input bytes `range` of `shard` for the input hash only (they are not written).
fn hash_range(ctx: &Ctx, shard: usize, range: std::ops::Range<u64>, sinks: &Sinks, pool: &Pool) -> Result<()> {
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(CHUNK as u64) as usize;
        let mut buf = pool.take(n);
        ctx.inputs[shard].read_exact_at(&mut buf, off).map_err(|e| ctx.read_error(shard, e))?;
        sinks.hash(&Arc::new(buf));
        off += n as u64;
    }
    Ok(())
}

/// Two passes over one tensor, chunk by chunk: the projections `c` (and `||W||_F`, and every
/// column's norm) while the input bytes go to the input hasher, then the rewrite, whose stored bytes
/// give `|VᵀW'|` (and, for norm-preserving edits, the columns' norms) before they go to the writer.
fn edit_tensor(ctx: &Ctx, i: usize, sinks: &Sinks, pool: &Pool) -> Result<Sent<Ledger>> {
    let e = &ctx.plan.edits[i];
    let basis = &ctx.units[i];
    let unit = basis.as_slice();
    let k = basis.k();
    let norm_preserving = ctx.plan.options.norm_preserving;
    let t = ctx.ckpt.entry(e.tensor);
    let shard = e.tensor.shard;
    let size = t.dtype.float_size().expect("plan() edits only float tensors");
    let view = View::new(e.writer.view(&t.shape));
    let row_bytes = view.inner * size;
    let rows_per_chunk = CHUNK.checked_div(row_bytes).unwrap_or(view.rows()).max(1);
    let start = ctx.ckpt.shards[shard].header.data_start() as u64 + t.begin as u64;
    let chunks = || (0..view.rows()).step_by(rows_per_chunk).map(move |r0| r0..(r0 + rows_per_chunk).min(view.rows()));
    let read = |rows: &std::ops::Range<usize>, buf: &mut Vec<u8>| -> Result<()> {
        let off = start + (rows.start * row_bytes) as u64;
        ctx.inputs[shard].read_exact_at(buf, off).map_err(|e| ctx.read_error(shard, e))
    };
    let mut c = vec![0f64; k * view.columns()];
    let mut sq = vec![0f64; view.columns()];
    for rows in chunks() {
        let mut buf = pool.take(rows.len() * row_bytes);
        read(&rows, &mut buf)?;
        kernel::accumulate_k(t.dtype, view, rows, &buf, unit, &mut c, Some(&mut sq));
        sinks.hash(&Arc::new(buf));
    }
    let factor = norm_preserving.then(|| kernel::norm_factors(&sq, &c, e.scale));
    let mut c_after = vec![0f64; k * view.columns()];
    let mut sq_after = norm_preserving.then(|| vec![0f64; view.columns()]);
    let mut max_change = 0f64;
    let mut input = Vec::new();
    for rows in chunks() {
        input.resize(rows.len() * row_bytes, 0);
        read(&rows, &mut input)?;
        let mut out = pool.take(input.len());
        let m = kernel::rewrite_k(t.dtype, view, rows.clone(), &input, unit, &c, e.scale, factor.as_deref(), &mut out);
        max_change = max_change.max(m);
        kernel::accumulate_k(t.dtype, view, rows, &out, unit, &mut c_after, sq_after.as_deref_mut());
        if let Err(g) = sinks.write(&Arc::new(out)) {
            return Ok(Err(g));
        }
    }
    // Norm-preserving edits: the largest relative change of a column's norm, as stored.
    let norm_drift = sq_after.map(|after| {
        sq.iter()
            .zip(&after)
            .filter(|(b, _)| **b > 0.0)
            .map(|(b, a)| (a.sqrt() / b.sqrt() - 1.0).abs())
            .fold(0.0, f64::max)
    });
    let mut ledger = ledger_entry(e, t.dtype, &c, &c_after, &sq, max_change);
    ledger.k = k;
    ledger.norm_drift = norm_drift;
    Ok(Ok(ledger))
}

fn ledger_entry(
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
        weight: e.weight,
        k: 1,
        norm_drift: None,
        proj_before: kernel::norm(c),
        proj_after: kernel::norm(c_after),
        frobenius: sq.iter().sum::<f64>().sqrt(),
        max_change,
    }
}

/// sha256 and length of a (small) input file.
fn hash_file(path: &Path, rel: &str) -> Result<FileRecord> {
    let bytes = std::fs::read(path).map_err(|cause| Error::Io { path: path.to_path_buf(), cause })?;
    Ok(FileRecord { path: rel.to_string(), sha256: direction::sha256_hex(&bytes), bytes: bytes.len() as u64 })
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
    direction: &Directions,
    out: &Path,
    opts: &WriteOptions,
    progress: &dyn Progress,
    create: &Create,
) -> Result<Report> {
    let units = plan.bases(ckpt, direction)?;
    let others: Vec<OtherFile> = ckpt
        .other_files()?
        .into_iter()
        .filter(|rel| rel.as_path() != Path::new(MANIFEST))
        .map(|rel| OtherFile { copy: !is_foreign_weights(&rel), rel })
        .collect();
    // Every input file we read.
    let mut abs_inputs: Vec<PathBuf> = ckpt.shards.iter().map(|s| s.path.clone()).collect();
    if ckpt.index.is_some() {
        abs_inputs.push(ckpt.dir.join(INDEX_FILE));
    }
    abs_inputs.extend(others.iter().filter(|o| o.copy).map(|o| ckpt.dir.join(&o.rel)));
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
    let (mut outputs, mut inputs, ledger) =
        write_all(&ctx, layouts, &others, config_bytes.as_deref(), index_bytes.as_deref())?;
    inputs.sort_by(|a, b| a.path.cmp(&b.path));

    let previous = std::fs::read(ckpt.dir.join(MANIFEST))
        .ok()
        .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or_else(|_| Value::String(direction::sha256_hex(&b))));
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

/// Writes every output file into the temporary directory; returns the output and input records
/// and the ledger.
fn write_all(
    ctx: &Ctx,
    layouts: Vec<ShardLayout>,
    others: &[OtherFile],
    config: Option<&[u8]>,
    index: Option<&[u8]>,
) -> Result<(Vec<FileRecord>, Vec<FileRecord>, Vec<Ledger>)> {
    let (mut outputs, mut inputs) = (Vec::new(), Vec::new());
    let mut ledger_by_edit: HashMap<String, Ledger> = HashMap::new();
    for (si, layout) in layouts.into_iter().enumerate() {
        let (output, input, ledger) = stream_shard(ctx, si, layout)?;
        outputs.push(output);
        inputs.push(input);
        for l in ledger {
            ledger_by_edit.insert(l.name.clone(), l);
        }
    }
    // A file copied as it is has the same hash on both sides; a rewritten one is hashed as read.
    let mut small = |rel: &str, rewritten: Option<&[u8]>| -> Result<()> {
        let out = match rewritten {
            Some(bytes) => {
                inputs.push(hash_file(&ctx.ckpt.dir.join(rel), rel)?);
                ctx.write_small(rel, bytes)?
            }
            None => {
                let out = ctx.copy_file(rel)?;
                inputs.push(out.clone());
                out
            }
        };
        outputs.push(out);
        Ok(())
    };
    if ctx.ckpt.index.is_some() {
        small(INDEX_FILE, index)?;
    }
    for o in others.iter().filter(|o| o.copy) {
        let rel = rel_string(&o.rel);
        let rewritten = if rel == "config.json" { config } else { None };
        small(&rel, rewritten)?;
    }
    // The ledger in plan order.
    let ledger = ctx.plan.edits.iter().filter_map(|e| ledger_by_edit.remove(&e.name)).collect();
    Ok((outputs, inputs, ledger))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

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
    fn direct_files_hold_exactly_what_was_written() {
        let tmp = tempfile::tempdir().unwrap();
        for (k, len) in
            [0usize, 1, 4095, 4096, 4097, STAGE - 1, STAGE, STAGE + 12345, 3 * STAGE + 7].into_iter().enumerate()
        {
            let path = tmp.path().join(format!("f{k}"));
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
            let mut f = create_file(&path, true).unwrap();
            // Uneven pieces, as chunks arrive.
            for piece in data.chunks(1_000_003) {
                f.write_all(piece).unwrap();
            }
            f.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn is_foreign_weights_skips_other_formats() {
        assert!(is_foreign_weights(Path::new("consolidated.safetensors")));
        assert!(is_foreign_weights(Path::new("pytorch_model.bin")));
        assert!(!is_foreign_weights(Path::new("tokenizer.json")));
        assert!(!is_foreign_weights(Path::new("tokenizer.model")));
    }

    pub(crate) fn full_disk(budget: u64) -> impl Fn(&Path, bool) -> io::Result<Box<dyn OutFile>> + Sync {
        let budget = Arc::new(std::sync::atomic::AtomicU64::new(budget));
        move |p: &Path, _streamed: bool| -> io::Result<Box<dyn OutFile>> {
            Ok(Box::new(FullDisk { file: File::create_new(p)?, budget: budget.clone() }))
        }
    }

    #[test]
    fn a_full_disk_is_a_clear_error_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let model = testutil::synth::llama(tmp.path(), checkpoint::Dtype::BF16, true);
        let dir = Direction::load(&testutil::synth::direction_file(tmp.path(), 64), 64).unwrap();
        let ckpt = Checkpoint::open(&model).unwrap();
        let plan = crate::plan(&ckpt, &crate::Options::default()).unwrap();
        let out = tmp.path().join("out");
        let before = testutil::synth::hash_dir(&model);
        for budget in [0u64, 100, 20_000] {
            let e = write_with(
                &ckpt,
                &plan,
                &Directions::from(dir.clone()),
                &out,
                &WriteOptions::default(),
                &NoProgress,
                &full_disk(budget),
            )
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
        assert_eq!(testutil::synth::hash_dir(&model), before);
    }
}
