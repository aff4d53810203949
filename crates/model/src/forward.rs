//! The forward pass: embedding, decoder layers with hook sites, final norm and LM head.
//!
//! One code path serves prompts (no cache, or filling a cache) and generation steps (one new token per
//! prompt, attending to its cache). Every family is the same loop driven by [`Arch`] flags.

use std::path::Path;

use checkpoint::Checkpoint;
use rayon::prelude::*;

use crate::arch::Arch;
use crate::batch::{Batch, Segment};
use crate::hooks::{Acts, At, Hook, Site};
use crate::kernels::{self, AttnParams, KvView};
use crate::load::{self, LoadOptions, WeightWidth, WeightsInfo};
use crate::rope;
use crate::weights::{Ffn, Layer, Linear, Mlp, MoeBlock, Weights};
use crate::{ModelError, Result};

/// Which logits a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None: the final norm and LM head are skipped (capture-only passes).
    None,
    /// The last position of each prompt (method.md §3 and §5 use only these): `[prompts, vocab]`.
    Last,
    /// Every position, packed like the batch's tokens: `[tokens, vocab]`.
    All,
}

/// What a forward pass returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    /// Row-major `[rows, vocab]` (see [`Logits`]); empty for [`Logits::None`].
    pub logits: Vec<f32>,
    pub vocab: usize,
}

impl Forward {
    /// Row `i` of the logits.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    pub fn rows(&self) -> usize {
        self.logits.len().checked_div(self.vocab).unwrap_or(0)
    }
}

/// A model loaded for inference: its architecture, its weights (f32 or at their stored width), and the
/// checkpoint (memory-mapped; token embeddings are read from it row by row).
pub struct Model {
    arch: Arch,
    w: Weights,
    ckpt: Checkpoint,
    info: WeightsInfo,
}

/// Keys and values of one prompt, per layer, for up to `capacity` positions: keys transposed
/// (`[kv_width, capacity]`, so attention scores vectorise over positions), values `[positions, kv_width]`.
pub(crate) struct RowCache {
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    pub capacity: usize,
    pub len: usize,
}

impl RowCache {
    pub fn new(layers: usize, capacity: usize, kv_width: usize) -> RowCache {
        // Key rows padded to whole vector blocks (attention reads them a block at a time).
        let capacity = capacity.next_multiple_of(crate::kernels::LANES);
        RowCache {
            layers: (0..layers)
                .map(|_| (vec![0f32; kv_width * capacity], Vec::with_capacity(kv_width * capacity)))
                .collect(),
            capacity,
            len: 0,
        }
    }

    /// A copy of the first `len` positions, with room for `capacity` (prefix reuse, `prefix.rs`).
    pub fn extended(&self, capacity: usize, kv_width: usize) -> RowCache {
        let mut out = RowCache::new(self.layers.len(), capacity.max(self.len), kv_width);
        for ((kt, v), (new_kt, new_v)) in self.layers.iter().zip(&mut out.layers) {
            for c in 0..kv_width {
                new_kt[c * out.capacity..][..self.len].copy_from_slice(&kt[c * self.capacity..][..self.len]);
            }
            new_v.extend_from_slice(v);
        }
        out.len = self.len;
        out
    }

    /// Forgets every position from `len` on (they are written again before attention reads them).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let kv_width = self.layers.first().map_or(0, |(kt, _)| kt.len() / self.capacity);
            for (_, v) in &mut self.layers {
                v.truncate(len * kv_width);
            }
            self.len = len;
        }
    }

    /// The bytes [`RowCache::new`] allocates (saturating).
    pub fn bytes(layers: usize, capacity: usize, kv_width: usize) -> u64 {
        let capacity = capacity.div_ceil(crate::kernels::LANES) as u64 * crate::kernels::LANES as u64;
        (layers as u64).saturating_mul(capacity).saturating_mul(kv_width as u64).saturating_mul(2 * 4)
    }
}

/// Per-token facts shared by every layer of one pass.
struct Ctx<'a> {
    segs: &'a [Segment],
    /// Token row -> index into `segs`.
    seg_of: Vec<u32>,
    /// Token row -> position id.
    pos: Vec<u32>,
    /// Per rotary spec: `(cos, sin)`, each `[tokens, dim / 2]`.
    rope: Vec<(Vec<f32>, Vec<f32>)>,
}

/// Scratch buffers reused by every layer.
#[derive(Default)]
struct Bufs {
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// Each prompt's keys, transposed (`[kv_width, len]` per prompt, prompts packed).
    kt: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

impl Model {
    /// Opens a model directory and loads it with [`LoadOptions::default`] (width chosen by the memory
    /// available, no progress reports).
    pub fn open(dir: &Path) -> Result<Model> {
        Model::open_with(dir, LoadOptions::default())
    }

    /// Opens a model directory and loads it as `opts` say.
    pub fn open_with(dir: &Path, opts: LoadOptions<'_>) -> Result<Model> {
        Model::load_with(Checkpoint::open(dir)?, opts)
    }

    /// Loads an opened checkpoint with [`LoadOptions::default`].
    pub fn load(ckpt: Checkpoint) -> Result<Model> {
        Model::load_with(ckpt, LoadOptions::default())
    }

    /// Loads an opened checkpoint: checks every tensor the forward pass needs against config.json (no
    /// allocation is sized by config.json before that), chooses the width and checks the memory, then
    /// packs the weights matrix by matrix, reporting progress.
    pub fn load_with(ckpt: Checkpoint, opts: LoadOptions<'_>) -> Result<Model> {
        let config_path = ckpt.dir.join("config.json");
        // Every layer has tensors of its own, so more layers than tensors is a config error (and Arch
        // allocates per layer).
        let tensors = ckpt.tensors().count();
        if ckpt.config.num_hidden_layers > tensors {
            return Err(ModelError::Config {
                path: config_path,
                problem: format!(
                    "`num_hidden_layers` is {}, but the checkpoint holds only {tensors} tensors",
                    ckpt.config.num_hidden_layers
                ),
            });
        }
        // The one tie rule (`Checkpoint::head`, shared with `edit`); an untied config without
        // lm_head.weight fails at load.
        let arch = Arch::from_config(&ckpt.config, ckpt.tied(), &config_path)?;
        let plan = Weights::plan(&ckpt, &arch)?;
        let available = opts.available_memory.or_else(load::available_memory);
        let width = load::choose(opts.weights, plan.f32, plan.stored, available)?;
        let loaded = Weights::load(&ckpt, &arch, width, plan.read, opts.progress)?;
        let info = WeightsInfo {
            requested: opts.weights,
            width,
            dtypes: loaded.held.iter().map(|h| h.name()).collect(),
            bytes: if width == WeightWidth::F32 { plan.f32 } else { plan.stored },
            f32_bytes: plan.f32,
            stored_bytes: plan.stored,
            available,
        };
        Ok(Model { arch, w: loaded.weights, ckpt, info })
    }

    /// What the weights are held as, how much memory they take, and why that width.
    pub fn weights_info(&self) -> &WeightsInfo {
        &self.info
    }

    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The checkpoint the model was loaded from.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The residual entering layer 0 (`x^(0)`, after any embedding scale): `[tokens, hidden]`.
    pub fn embed(&self, batch: &Batch) -> Result<Vec<f32>> {
        let d = self.arch.hidden;
        for seg in batch.segments() {
            for (i, &t) in batch.tokens()[seg.range()].iter().enumerate() {
                if t as usize >= self.arch.vocab {
                    return Err(ModelError::Token {
                        row: seg.row,
                        position: seg.pos0 + i,
                        token: t,
                        vocab: self.arch.vocab,
                    });
                }
            }
        }
        let mut x = vec![0f32; batch.tokens().len() * d];
        let scale = self.arch.embed_scale;
        let dtype = self.w.embed_dtype;
        let size = dtype.float_size().expect("Weights::load checked the embedding is a float tensor");
        let bytes = self.ckpt.bytes(self.w.embed);
        x.par_chunks_mut(d).zip(batch.tokens().par_iter()).with_min_len(16).for_each(|(row, &t)| {
            checkpoint::dtype::decode_f32(dtype, &bytes[t as usize * d * size..][..d * size], row);
            if let Some(s) = scale {
                row.iter_mut().for_each(|r| *r *= s);
            }
        });
        Ok(x)
    }

    /// Runs the whole model on a batch of prompts (each from position 0, no cache).
    pub fn forward(&self, batch: &Batch, logits: Logits, hook: &mut dyn Hook) -> Result<Forward> {
        let x = self.embed(batch)?;
        self.forward_from(0, x, batch, logits, hook)
    }

    /// Runs layers `layer..` from a given residual entering `layer` (`[tokens, hidden]`, packed like the
    /// batch), e.g. a cached `x^(l)` plus a candidate direction (method.md §5, prefix reuse). Hooks at
    /// `Input` of `layer` see the given residual.
    pub fn forward_from(
        &self,
        layer: usize,
        mut residual: Vec<f32>,
        batch: &Batch,
        logits: Logits,
        hook: &mut dyn Hook,
    ) -> Result<Forward> {
        let d = self.arch.hidden;
        if layer > self.arch.layers {
            return Err(ModelError::Batch(format!(
                "cannot start at layer {layer}: the model has {} layers",
                self.arch.layers
            )));
        }
        if residual.len() != batch.tokens().len() * d {
            return Err(ModelError::Batch(format!(
                "the residual has {} values; {} tokens x hidden size {d} need {}",
                residual.len(),
                batch.tokens().len(),
                batch.tokens().len() * d
            )));
        }
        if let Some(s) = batch.segments().iter().find(|s| s.pos0 != 0) {
            return Err(ModelError::Batch(format!("prompt {} does not start at position 0", s.row)));
        }
        self.run(&mut residual, batch, layer, None, hook)?;
        Ok(self.logits(&residual, batch.segments(), logits))
    }

    /// Runs layers `from..` on `x` in place. With a cache, each segment's keys and values are appended to
    /// `cache[segment.row]` (whose length must equal the segment's `pos0`) and attention reads the cache.
    pub(crate) fn run(
        &self,
        x: &mut [f32],
        batch: &Batch,
        from: usize,
        mut cache: Option<&mut [RowCache]>,
        hook: &mut dyn Hook,
    ) -> Result<()> {
        let ctx = self.context(batch);
        let mut bufs = Bufs::default();
        for l in from..self.arch.layers {
            self.layer(l, x, &ctx, cache.as_deref_mut(), hook, &mut bufs)?;
        }
        Ok(())
    }

    fn context<'a>(&self, batch: &'a Batch) -> Ctx<'a> {
        let segs = batch.segments();
        let t = batch.tokens().len();
        let mut seg_of = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        for (i, s) in segs.iter().enumerate() {
            for p in 0..s.len {
                seg_of.push(i as u32);
                pos.push((s.pos0 + p) as u32);
            }
        }
        let rope = self
            .arch
            .ropes
            .iter()
            .map(|spec| {
                let half = spec.dim / 2;
                let (mut cos, mut sin) = (vec![0f32; t * half], vec![0f32; t * half]);
                let fixed = (!spec.depends_on_length()).then(|| spec.inv_freq(1));
                for s in segs {
                    let own;
                    let inv = match &fixed {
                        Some(f) => f,
                        None => {
                            own = spec.inv_freq(s.pos0 + s.len);
                            &own
                        }
                    };
                    for i in s.range() {
                        let p = pos[i] as usize;
                        spec.cos_sin(inv, p, &mut cos[i * half..(i + 1) * half], &mut sin[i * half..(i + 1) * half]);
                    }
                }
                (cos, sin)
            })
            .collect();
        Ctx { segs, seg_of, pos, rope }
    }

    fn visit(&self, hook: &mut dyn Hook, layer: usize, site: Site, data: &mut [f32], ctx: &Ctx<'_>) -> Result<()> {
        let at = At { layer, site };
        if hook.wants(at) {
            hook.visit(at, Acts { data, hidden: self.arch.hidden, segments: ctx.segs })?;
        }
        Ok(())
    }

    fn layer(
        &self,
        l: usize,
        x: &mut [f32],
        ctx: &Ctx<'_>,
        cache: Option<&mut [RowCache]>,
        hook: &mut dyn Hook,
        b: &mut Bufs,
    ) -> Result<()> {
        let a = &self.arch;
        let w: &Layer = &self.w.layers[l];
        let d = a.hidden;
        let t = x.len() / d;
        let hd = a.head_dim;
        let (q_w, kv_w, qkv_w) = (a.heads * hd, a.kv_width(), a.qkv_width());

        self.visit(hook, l, Site::Input, x, ctx)?;

        // Attention.
        let h = resize(&mut b.h, t * d);
        kernels::rms_norm(x, &w.input_norm, a.norm_eps, h);
        let qkv = resize(&mut b.qkv, t * qkv_w);
        linear(h, t, &w.qkv, qkv);
        let kind = &a.attention[l];
        let (cos, sin) = &ctx.rope[kind.rope];
        let half = a.ropes[kind.rope].dim / 2;
        qkv.par_chunks_mut(qkv_w).enumerate().with_min_len(4).for_each(|(i, row)| {
            let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            for (head, norm) in row[..q_w + kv_w]
                .chunks_mut(hd)
                .enumerate()
                .map(|(j, h)| (h, if j < a.heads { &w.q_norm } else { &w.k_norm }))
            {
                if let Some(g) = norm {
                    kernels::rms_norm_row_inplace(head, g, a.norm_eps);
                }
                rope::apply(head, c, s);
            }
        });
        let params = AttnParams {
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: hd,
            scale: a.score_scale,
            softcap: a.attn_softcap,
            window: kind.window,
        };
        let attn = resize(&mut b.attn, t * q_w);
        match cache {
            None => {
                // Each prompt's keys transposed, rows padded to whole vector blocks.
                let strides: Vec<usize> = ctx.segs.iter().map(|s| s.len.next_multiple_of(kernels::LANES)).collect();
                let kt = resize(&mut b.kt, strides.iter().sum::<usize>() * kv_w);
                let mut offsets = Vec::with_capacity(ctx.segs.len());
                let mut at = 0;
                for (s, &stride) in ctx.segs.iter().zip(&strides) {
                    offsets.push(at);
                    let seg_kt = &mut kt[at..at + stride * kv_w];
                    for (j, i) in s.range().enumerate() {
                        for (c, k) in qkv[i * qkv_w + q_w..][..kv_w].iter().enumerate() {
                            seg_kt[c * stride + j] = *k;
                        }
                    }
                    at += stride * kv_w;
                }
                let views: Vec<KvView<'_>> = ctx
                    .segs
                    .iter()
                    .zip(strides.iter().zip(&offsets))
                    .map(|(s, (&stride, &off))| KvView {
                        kt: &kt[off..off + stride * kv_w],
                        kt_stride: stride,
                        v: &qkv[s.start * qkv_w + q_w + kv_w..],
                        v_stride: qkv_w,
                        n: s.len,
                    })
                    .collect();
                kernels::attention(qkv, qkv_w, &ctx.seg_of, &ctx.pos, &views, &params, attn);
            }
            Some(cache) => {
                for s in ctx.segs {
                    let rc = &mut cache[s.row];
                    let cap = rc.capacity;
                    let (kt, v) = &mut rc.layers[l];
                    debug_assert_eq!(v.len(), s.pos0 * kv_w, "cache length equals the segment's first position");
                    assert!(s.pos0 + s.len <= cap, "generation sizes each cache for its prompt and max_new_tokens");
                    for (j, i) in s.range().enumerate() {
                        let row = &qkv[i * qkv_w..(i + 1) * qkv_w];
                        for (c, k) in row[q_w..q_w + kv_w].iter().enumerate() {
                            kt[c * cap + s.pos0 + j] = *k;
                        }
                        v.extend_from_slice(&row[q_w + kv_w..]);
                    }
                }
                let views: Vec<KvView<'_>> = ctx
                    .segs
                    .iter()
                    .map(|s| {
                        let rc = &cache[s.row];
                        let (kt, v) = &rc.layers[l];
                        KvView { kt, kt_stride: rc.capacity, v, v_stride: kv_w, n: v.len() / kv_w }
                    })
                    .collect();
                kernels::attention(qkv, qkv_w, &ctx.seg_of, &ctx.pos, &views, &params, attn);
            }
        }
        let o = resize(&mut b.o, t * d);
        linear(attn, t, &w.o, o);
        if let Some(g) = &w.post_attn_norm {
            kernels::rms_norm_inplace(o, g, a.norm_eps);
        }
        self.visit(hook, l, Site::Attn, o, ctx)?;
        kernels::add_inplace(x, o, d);

        // MLP.
        let h = resize(&mut b.h, t * d);
        kernels::rms_norm(x, &w.pre_mlp_norm, a.norm_eps, h);
        let o = resize(&mut b.o, t * d);
        match &w.ffn {
            Ffn::Dense(m) => mlp(m, a.activation, h, t, o, &mut b.gate_up, &mut b.act),
            Ffn::Moe(m) => self.moe(m, h, t, o),
        }
        if let Some(g) = &w.post_mlp_norm {
            kernels::rms_norm_inplace(o, g, a.norm_eps);
        }
        self.visit(hook, l, Site::Mlp, o, ctx)?;
        kernels::add_inplace(x, o, d);

        self.visit(hook, l, Site::Output, x, ctx)
    }

    /// A mixture-of-experts block: softmax routing, top-k, optional renormalisation, experts summed in
    /// ascending expert order (as transformers' `index_add_` loop), then Qwen2-MoE's gated shared expert.
    fn moe(&self, m: &MoeBlock, h: &[f32], t: usize, out: &mut [f32]) {
        let spec = self.arch.moe.as_ref().expect("MoE layers have a MoE spec");
        let d = self.arch.hidden;
        let e_n = m.experts.len();
        let mut router = vec![0f32; t * e_n];
        linear(h, t, &m.router, &mut router);
        // Per expert: (token, weight), tokens ascending.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
        let mut order: Vec<usize> = Vec::with_capacity(e_n);
        for (tok, logits) in router.chunks_mut(e_n).enumerate() {
            kernels::softmax_row(logits);
            order.clear();
            order.extend(0..e_n);
            // Descending probability, lower expert index first on ties.
            order.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]).then(i.cmp(&j)));
            let top = &order[..spec.top_k];
            let mut weights: Vec<f32> = top.iter().map(|&e| logits[e]).collect();
            if spec.renormalize {
                let sum = weights.iter().fold(0f32, |a, b| a + b);
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            for (&e, &w) in top.iter().zip(&weights) {
                assigned[e].push((tok, w));
            }
        }
        out.fill(0.0);
        let (mut xe, mut ye, mut gate_up, mut act) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (e, toks) in assigned.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let n = toks.len();
            let xs = resize(&mut xe, n * d);
            for (row, &(tok, _)) in xs.chunks_mut(d).zip(toks) {
                row.copy_from_slice(&h[tok * d..(tok + 1) * d]);
            }
            let ys = resize(&mut ye, n * d);
            mlp(&m.experts[e], self.arch.activation, xs, n, ys, &mut gate_up, &mut act);
            for (row, &(tok, w)) in ys.chunks(d).zip(toks) {
                for (o, y) in out[tok * d..(tok + 1) * d].iter_mut().zip(row) {
                    *o += y * w;
                }
            }
        }
        if let Some((shared, gate)) = &m.shared {
            let ys = resize(&mut ye, t * d);
            mlp(shared, self.arch.activation, h, t, ys, &mut gate_up, &mut act);
            let mut g = vec![0f32; t];
            linear(h, t, gate, &mut g);
            for ((o, y), g) in out.chunks_mut(d).zip(ys.chunks(d)).zip(&g) {
                let s = 1.0 / (1.0 + (-g).exp());
                for (o, y) in o.iter_mut().zip(y) {
                    *o += s * y;
                }
            }
        }
    }

    /// Final norm, LM head and soft-capping for the rows `which` asks for.
    pub(crate) fn logits(&self, x: &[f32], segs: &[Segment], which: Logits) -> Forward {
        let d = self.arch.hidden;
        let vocab = self.arch.vocab;
        let rows: Vec<usize> = match which {
            Logits::None => return Forward { logits: Vec::new(), vocab },
            Logits::Last => segs.iter().map(|s| s.start + s.len - 1).collect(),
            Logits::All => (0..x.len() / d).collect(),
        };
        let mut h = vec![0f32; rows.len() * d];
        h.par_chunks_mut(d).zip(rows.par_iter()).for_each(|(o, &r)| {
            kernels::rms_norm_row(&x[r * d..(r + 1) * d], &self.w.final_norm, self.arch.norm_eps, o)
        });
        let mut logits = vec![0f32; rows.len() * vocab];
        self.w.lm_head.matmul(&h, rows.len(), &mut logits);
        if let Some(cap) = self.arch.final_softcap {
            logits.par_iter_mut().with_min_len(4096).for_each(|z| *z = kernels::softcap(*z, cap));
        }
        Forward { logits, vocab }
    }
}

fn linear(x: &[f32], rows: usize, l: &Linear, out: &mut [f32]) {
    l.w.matmul(x, rows, out);
    if let Some(b) = &l.bias {
        kernels::add_bias(&mut out[..rows * l.w.out()], b);
    }
}

fn mlp(
    m: &Mlp,
    act: crate::arch::Activation,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    gate_up: &mut Vec<f32>,
    mid: &mut Vec<f32>,
) {
    let gu = resize(gate_up, rows * 2 * m.ff);
    linear(x, rows, &m.gate_up, gu);
    let mid = resize(mid, rows * m.ff);
    kernels::gated_activation(gu, m.ff, act, mid);
    linear(mid, rows, &m.down, out);
}
