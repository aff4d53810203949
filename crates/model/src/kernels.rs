//! The hot loops, on plain f32 slices: matrix products (the `gemm` crate, candle's CPU matmul engine,
//! called directly so that buffers are reused and no tensor bookkeeping sits on the decode path), RMSNorm,
//! activations, and attention over keys and values in place (a prompt's own q/k/v rows, or its KV cache).
//!
//! Parallel loops split independent rows (tokens) only; every reduction runs in a fixed order inside one
//! task, so results are identical for any thread count. `gemm` splits output blocks, not the inner sum
//! (checked: 1 and 2 threads agree bit for bit).

use rayon::prelude::*;

use crate::arch::{Activation, ScoreScale};

/// Rows per rayon task in element-wise loops (keeps task overhead negligible for small batches).
const MIN_ROWS: usize = 8;

/// Output columns per weight panel: one AVX-512 microkernel's rows (4 vectors of 16 f32).
const PANEL: usize = 64;

/// A weight matrix `W` (`[out, inp]`, `y = x Wᵀ`) stored panel-major: for each block of [`PANEL`] output
/// columns, `Wᵀ[:, block]` as a contiguous `[inp, PANEL]` array (the last panel zero-padded).
///
/// `gemm` reads such a panel in place as the column-major operand its microkernel wants, so a product
/// never repacks the weights, and one panel (`inp * PANEL` floats) stays in cache while every row of `x`
/// passes over it. Measured on this machine with weights streamed from memory: 200 GFLOP/s at 32 rows,
/// where one `gemm` call on `[inp, out]` reaches 113 and on `[out, inp]` about 50 (it repacks every call).
pub struct Panels {
    data: Vec<f32>,
    inp: usize,
    out: usize,
}

impl Panels {
    /// From a row-major `[out, inp]` matrix (transformers' layout).
    pub fn from_rows(w: &[f32], out: usize, inp: usize) -> Panels {
        assert_eq!(w.len(), out * inp, "weight size (caller invariant)");
        let panels = out.div_ceil(PANEL);
        let mut data = vec![0f32; panels * inp * PANEL];
        if inp == 0 {
            return Panels { data, inp, out };
        }
        for (j, row) in w.chunks_exact(inp).enumerate() {
            let panel = &mut data[(j / PANEL) * inp * PANEL..][..inp * PANEL];
            for (i, v) in row.iter().enumerate() {
                panel[i * PANEL + j % PANEL] = *v;
            }
        }
        Panels { data, inp, out }
    }

    pub fn out(&self) -> usize {
        self.out
    }

    /// `y[m, out] = x[m, inp] · Wᵀ`. Panels run in parallel, each as one single-threaded `gemm` call, so
    /// every output value is computed the same way whatever the thread count.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.inp, self.out);
        assert!(x.len() >= m * k && y.len() >= m * n, "matmul operand sizes (caller invariant)");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            y[..m * n].fill(0.0);
            return;
        }
        let dst = SendPtr(y.as_mut_ptr());
        self.data.par_chunks(k * PANEL).enumerate().for_each(|(p, panel)| {
            let width = PANEL.min(n - p * PANEL);
            let dst = &dst;
            // SAFETY: task `p` writes only columns p*PANEL .. p*PANEL+width of the m rows of `y` (row
            // stride n), disjoint from every other task and inside `y` (asserted above); it reads `x`
            // (m×k, row stride k) and its own panel (k×PANEL, row stride PANEL, first `width` columns).
            unsafe {
                gemm::gemm(
                    m,
                    width,
                    k,
                    dst.0.add(p * PANEL),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    1,
                    PANEL as isize,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    }
}

/// The output pointer shared by the panel tasks (each writes its own columns).
struct SendPtr(*mut f32);
// SAFETY: see `Panels::matmul`: tasks write disjoint columns.
unsafe impl Sync for SendPtr {}

/// Adds a bias to every row.
pub fn add_bias(out: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    out.par_chunks_mut(n).with_min_len(MIN_ROWS).for_each(|row| {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    });
}

/// The mean of squares of one row, accumulated in f64 (a fixed order), rounded to f32.
#[inline]
fn mean_square(x: &[f32]) -> f32 {
    let mut acc = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += c[i] as f64 * c[i] as f64;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for v in rest {
        s += *v as f64 * *v as f64;
    }
    (s / x.len() as f64) as f32
}

/// RMSNorm of one row: `x * rsqrt(mean(x²) + eps)`, then times the gain `g` (`w`, or Gemma's `1 + w`).
#[inline]
pub fn rms_norm_row(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let r = 1.0f32 / (mean_square(x) + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(g) {
        *o = (v * r) * w;
    }
}

/// RMSNorm of one row in place.
#[inline]
pub fn rms_norm_row_inplace(x: &mut [f32], g: &[f32], eps: f32) {
    let r = 1.0f32 / (mean_square(x) + eps).sqrt();
    for (v, w) in x.iter_mut().zip(g) {
        *v = (*v * r) * w;
    }
}

/// RMSNorm of every row of `x` (`[rows, d]`) into `out`.
pub fn rms_norm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    out.par_chunks_mut(d).zip(x.par_chunks(d)).with_min_len(MIN_ROWS).for_each(|(o, x)| rms_norm_row(x, g, eps, o));
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], g: &[f32], eps: f32) {
    let d = g.len();
    x.par_chunks_mut(d).with_min_len(MIN_ROWS).for_each(|row| rms_norm_row_inplace(row, g, eps));
}

/// `x += y`, element-wise.
pub fn add_inplace(x: &mut [f32], y: &[f32], d: usize) {
    x.par_chunks_mut(d).zip(y.par_chunks(d)).with_min_len(MIN_ROWS).for_each(|(x, y)| {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    });
}

#[inline]
fn activate(a: Activation, x: f32) -> f32 {
    match a {
        // torch's silu: x / (1 + exp(-x)).
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Gelu => (0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2))) as f32,
        Activation::GeluTanh => {
            // torch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5 = sqrt(2/pi), formed in double.
            const K: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
            let cube = x * x * x;
            let inner = K * (x + 0.044715 * cube);
            0.5 * x * (1.0 + inner.tanh())
        }
        Activation::Relu => x.max(0.0),
    }
}

/// The gated MLP's middle: `act(gate) * up` for rows of `[gate | up]` (`gate_up`: `[rows, 2 ff]`).
pub fn gated_activation(gate_up: &[f32], ff: usize, a: Activation, out: &mut [f32]) {
    out.par_chunks_mut(ff).zip(gate_up.par_chunks(2 * ff)).with_min_len(MIN_ROWS).for_each(|(o, gu)| {
        let (g, u) = gu.split_at(ff);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = activate(a, *g) * u;
        }
    });
}

/// `tanh(x / cap) * cap`, as Gemma 2/3 soft-cap scores and logits.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// Softmax of one row in place (max-subtracted, f32 like torch's `softmax(dtype=float32)`).
pub fn softmax_row(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Dot product with eight independent f32 accumulators (vectorisable; fixed order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Keys and values one prompt's queries attend to: row `j` of keys is `k[j * stride..][..kv_width]`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    /// Number of key rows (the prompt's positions `0..n`).
    pub n: usize,
}

/// The attention settings of one layer.
pub struct AttnParams {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: ScoreScale,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// Causal attention for every query row. `q` is `[tokens, q_stride]` with the heads' queries at the
/// start of each row; query `t` sits at position `position[t]` of prompt `segment[t]`, whose keys and
/// values are `kv[segment[t]]`. Writes `out` (`[tokens, heads * head_dim]`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_stride: usize,
    segment: &[u32],
    position: &[u32],
    kv: &[KvView<'_>],
    p: &AttnParams,
    out: &mut [f32],
) {
    let hd = p.head_dim;
    let group = p.heads / p.kv_heads;
    out.par_chunks_mut(p.heads * hd).enumerate().for_each(|(t, o)| {
        let view = kv[segment[t] as usize];
        let pos = position[t] as usize;
        let hi = pos + 1; // keys 0..=pos
        let lo = match p.window {
            Some(w) => hi.saturating_sub(w),
            None => 0,
        };
        debug_assert!(hi <= view.n, "a query never attends past its prompt's keys");
        let mut scores = vec![0f32; hi - lo];
        let qrow = &q[t * q_stride..];
        for h in 0..p.heads {
            let g = h / group;
            let qh = &qrow[h * hd..(h + 1) * hd];
            for (j, s) in (lo..hi).zip(scores.iter_mut()) {
                let kj = &view.k[j * view.stride + g * hd..][..hd];
                let raw = dot(qh, kj);
                let mut v = match p.scale {
                    ScoreScale::Mul(m) => raw * m,
                    ScoreScale::Div(d) => raw / d,
                };
                if let Some(cap) = p.softcap {
                    v = softcap(v, cap);
                }
                *s = v;
            }
            softmax_row(&mut scores);
            let oh = &mut o[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            for (j, &w) in (lo..hi).zip(scores.iter()) {
                let vj = &view.v[j * view.stride + g * hd..][..hd];
                for (a, b) in oh.iter_mut().zip(vj) {
                    *a += w * b;
                }
            }
        }
    });
}

/// Index of the largest value, the first one on ties (as `torch.argmax`); NaN counts as largest.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate().skip(1) {
        let b = x[best];
        if b.is_nan() {
            break;
        }
        if v.is_nan() || v > b {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn panel_products_match_a_naive_product_for_any_width_and_thread_count() {
        for (m, k, n) in [(1, 5, 3), (3, 5, 4), (37, 300, 200), (9, 64, 128), (2, 0, 3)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
            let p = Panels::from_rows(&w, n, k);
            let want = naive(&x, m, k, &w, n);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut out = vec![f32::NAN; m * n];
                pool.install(|| p.matmul(&x, m, &mut out));
                out
            };
            let one = run(1);
            let diff = one.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "({m}, {k}, {n}): {diff}");
            assert_eq!(run(2), one, "({m}, {k}, {n}): 2 threads");
            assert_eq!(run(3), one, "({m}, {k}, {n}): 3 threads");
        }
    }

    #[test]
    fn rms_norm_of_a_constant_row_is_the_gain() {
        let x = vec![3.0f32; 4];
        let g = vec![1.0, 2.0, 0.5, -1.0];
        let mut out = vec![0.0; 4];
        rms_norm(&x, &g, 0.0, &mut out);
        assert_eq!(out, g);
    }

    #[test]
    fn activations_match_their_definitions() {
        assert_eq!(activate(Activation::Relu, -2.0), 0.0);
        assert!((activate(Activation::Silu, 1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((activate(Activation::Gelu, 1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((activate(Activation::GeluTanh, 1.0) - 0.841_192).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_argmax_takes_the_first_maximum() {
        let mut x = vec![1.0, 3.0, 3.0, -1.0];
        assert_eq!(argmax(&x), 1);
        softmax_row(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[1], x[2]);
        assert_eq!(argmax(&[0.0, f32::NAN, 5.0]), 1);
    }

    #[test]
    fn attention_with_one_key_returns_its_value_and_windows_limit_keys() {
        // Two positions, one head of dim 2; keys/values stored [k | v] per row with stride 4.
        let kv_rows = [1.0f32, 0.0, 10.0, 20.0, 0.0, 1.0, 30.0, 40.0];
        let view = KvView { k: &kv_rows[..], v: &kv_rows[2..], stride: 4, n: 2 };
        let q = [1.0f32, 1.0, 1.0, 1.0];
        let params = |window| AttnParams {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            scale: ScoreScale::Mul(1.0),
            softcap: None,
            window,
        };
        let mut out = vec![0f32; 4];
        attention(&q, 2, &[0, 0], &[0, 1], &[view], &params(None), &mut out);
        assert_eq!(&out[..2], &[10.0, 20.0]);
        // Equal scores at position 1: the mean of both values.
        assert_eq!(&out[2..], &[20.0, 30.0]);
        attention(&q, 2, &[0, 0], &[0, 1], &[view], &params(Some(1)), &mut out);
        assert_eq!(&out[2..], &[30.0, 40.0]);
    }
}
