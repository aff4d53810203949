//! The hot loops, on plain f32 slices: matrix products (the `gemm` crate, candle's CPU matmul engine,
//! called directly so that buffers are reused and no tensor bookkeeping sits on the decode path), RMSNorm,
//! activations, and attention over keys and values in place (a prompt's own q/k/v rows, or its KV cache).
//!
//! Parallel loops split independent rows (tokens) only; every reduction runs in a fixed order inside one
//! task, so results are identical for any thread count. `gemm` splits output blocks, not the inner sum
//! (checked: 1 and 2 threads agree bit for bit).

use rayon::prelude::*;

use crate::arch::{Activation, ScoreScale};
use crate::panel_avx512;

/// Rows per rayon task in element-wise loops: a generation step (one row per prompt) runs them on one
/// thread, where splitting would cost more than it saves.
const MIN_ROWS: usize = 64;

/// Output columns per weight panel: one AVX-512 microkernel's rows (4 vectors of 16 f32).
pub(crate) const PANEL: usize = 64;

/// Values per register-resident accumulator block in attention (one AVX-512 vector).
pub const LANES: usize = 16;

/// The widest vector instructions the CPU has, for the loops the compiler vectorises itself. Every
/// variant runs the same Rust code (same operations, same order), so results do not depend on it.
#[derive(Clone, Copy)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }
}

/// Calls the variant of a row kernel for the detected instruction set.
macro_rules! dispatch {
    ($simd:expr, $f:ident, $f512:ident, $f2:ident, ($($a:expr),*)) => {
        match $simd {
            // SAFETY: `Simd::detect` saw the CPU support these instructions.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { $f512($($a),*) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { $f2($($a),*) },
            Simd::Baseline => $f($($a),*),
        }
    };
}

/// Compiles an `#[inline(always)]` row kernel again for AVX-512 and for AVX2 (the same code: the compiler
/// vectorises it wider; no fused multiply-adds are introduced, so the results are the same).
macro_rules! variants {
    ($f:ident, $f512:ident, $f2:ident, ($($a:ident: $t:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $f512($($a: $t),*) {
            $f($($a),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $f2($($a: $t),*) {
            $f($($a),*)
        }
    };
}

/// A weight matrix `W` (`[out, inp]`, `y = x Wᵀ`) stored panel-major: for each block of [`PANEL`] output
/// columns, `Wᵀ[:, block]` as a contiguous `[inp, PANEL]` array (the last panel zero-padded).
///
/// `gemm` reads such a panel in place as the column-major operand its microkernel wants, so a product
/// never repacks the weights, and one panel (`inp * PANEL` floats) stays in cache while every row of `x`
/// passes over it. Measured on this machine with weights streamed from memory: 200 GFLOP/s at 32 rows,
/// where one `gemm` call on `[inp, out]` reaches 113 and on `[out, inp]` about 50 (it repacks every call).
///
/// The values are held as f32 or at their stored width (bf16, f16: [`Store`]). A narrow panel is widened
/// (exactly) into a per-thread f32 buffer just before its `gemm` call, which then runs exactly as on an f32
/// panel: a product gives the same bits whichever width the weights are held at.
pub struct Panels {
    store: Store,
    inp: usize,
    out: usize,
}

/// How a matrix's values are held in memory.
enum Store {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// IEEE half-precision bit patterns.
    F16(Vec<u16>),
}

/// The element types a matrix can be held in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    F32,
    Bf16,
    F16,
}

impl Held {
    pub fn name(self) -> &'static str {
        match self {
            Held::F32 => "f32",
            Held::Bf16 => "bf16",
            Held::F16 => "f16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Held::F32 => 4,
            Held::Bf16 | Held::F16 => 2,
        }
    }
}

/// One block of rows of a matrix to pack: its stored little-endian bytes (`rows * inp` elements).
#[derive(Clone, Copy)]
pub struct RowBlock<'a> {
    pub bytes: &'a [u8],
    pub dtype: checkpoint::Dtype,
    pub rows: usize,
}

/// Inner-dimension rows of a panel per `gemm` call (`[K_CHUNK, PANEL]` f32 is 512 KiB, so a widened chunk
/// stays in L2). Every model up to 2048 wide runs one call per panel; wider ones accumulate chunks in
/// order, at f32 and at stored width alike (so both widths still give the same bits).
const K_CHUNK: usize = 2048;

/// Input columns copied per step while packing: a `[PACK_COLS, PANEL]` block of the output stays in L1.
const PACK_COLS: usize = 256;

impl Panels {
    /// From a row-major `[out, inp]` matrix (transformers' layout).
    #[cfg(test)]
    pub fn from_rows(w: &[f32], out: usize, inp: usize) -> Panels {
        assert_eq!(w.len(), out * inp, "weight size (caller invariant)");
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        Panels::pack(&[RowBlock { bytes: &bytes, dtype: checkpoint::Dtype::F32, rows: out }], inp, Held::F32)
    }

    /// The number of elements a packed `[out, inp]` matrix holds (output columns padded to whole panels).
    pub fn padded_len(out: usize, inp: usize) -> Option<usize> {
        out.div_ceil(PANEL).checked_mul(PANEL)?.checked_mul(inp)
    }

    /// Packs the rows of `blocks` (stacked in order: `[block 0 rows; block 1 rows; ...]`) into panels held
    /// as `held`. `Held::F32` decodes any float dtype exactly (f64 rounds); `Held::Bf16`/`F16` copy bit
    /// patterns and need every block in that dtype. Panels are packed in parallel, straight from the
    /// stored bytes: no other copy of the matrix is made.
    pub fn pack(blocks: &[RowBlock<'_>], inp: usize, held: Held) -> Panels {
        let out: usize = blocks.iter().map(|b| b.rows).sum();
        for b in blocks {
            let size = b.dtype.float_size().expect("pack needs float tensors (caller invariant)");
            assert_eq!(b.bytes.len(), b.rows * inp * size, "block size (caller invariant)");
            let same = matches!(
                (held, b.dtype),
                (Held::F32, _) | (Held::Bf16, checkpoint::Dtype::BF16) | (Held::F16, checkpoint::Dtype::F16)
            );
            assert!(same, "a {held:?} matrix packs {held:?} tensors only (caller invariant)");
        }
        let len = Panels::padded_len(out, inp).expect("the caller checked the matrix fits in memory");
        let store = match held {
            Held::F32 => Store::F32(pack_values(blocks, inp, len, |b, bytes, out: &mut [f32]| {
                checkpoint::dtype::decode_f32(b.dtype, bytes, out)
            })),
            Held::Bf16 | Held::F16 => {
                let data = pack_values(blocks, inp, len, |_, bytes, out: &mut [u16]| {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = u16::from_le_bytes([c[0], c[1]]);
                    }
                });
                if held == Held::Bf16 { Store::Bf16(data) } else { Store::F16(data) }
            }
        };
        Panels { store, inp, out }
    }

    pub fn out(&self) -> usize {
        self.out
    }

    /// `y[m, out] = x[m, inp] · Wᵀ`. Panels run in parallel, each as one single-threaded `gemm` call, so
    /// every output value is computed the same way whatever the thread count and the width the weights
    /// are held at.
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
        let dst = &dst;
        let own = panel_avx512::available();
        match &self.store {
            Store::F32(data) => data.par_chunks(k * PANEL).enumerate().for_each(|(p, panel)| {
                for c0 in (0..k).step_by(K_CHUNK) {
                    let kc = K_CHUNK.min(k - c0);
                    // SAFETY: see `panel_product`; the chunk has kc * PANEL values.
                    unsafe { panel_product(own, x, m, k, n, p, c0, &panel[c0 * PANEL..(c0 + kc) * PANEL], dst) }
                }
            }),
            Store::Bf16(data) | Store::F16(data) => {
                let simd = Simd::detect();
                let bf16 = matches!(self.store, Store::Bf16(_));
                data.par_chunks(k * PANEL).enumerate().for_each(|(p, panel)| {
                    WIDE.with_borrow_mut(|wide| {
                        for c0 in (0..k).step_by(K_CHUNK) {
                            let kc = K_CHUNK.min(k - c0);
                            let (src, wide) = (&panel[c0 * PANEL..(c0 + kc) * PANEL], resize_wide(wide, kc * PANEL));
                            if bf16 {
                                dispatch!(simd, widen_bf16, widen_bf16_avx512, widen_bf16_avx2, (src, wide));
                            } else {
                                use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
                                // Exact; F16C instructions where the CPU has them.
                                src.reinterpret_cast::<half::f16>().convert_to_f32_slice(wide);
                            }
                            // SAFETY: see `panel_product`; `wide` has kc * PANEL values.
                            unsafe { panel_product(own, x, m, k, n, p, c0, wide, dst) }
                        }
                    })
                });
            }
        }
    }
}

/// Packs the stacked rows of `blocks` into `len` values of panels (see [`Panels`]): panels in parallel,
/// each filled [`PACK_COLS`] input columns at a time (`decode` turns a run of stored bytes into values).
fn pack_values<T: Copy + Default + Send>(
    blocks: &[RowBlock<'_>],
    inp: usize,
    len: usize,
    decode: impl Fn(&RowBlock<'_>, &[u8], &mut [T]) + Sync,
) -> Vec<T> {
    let mut data = vec![T::default(); len];
    if inp == 0 {
        return data;
    }
    // The block and row within it of every stacked row.
    let rows: Vec<(usize, usize)> =
        blocks.iter().enumerate().flat_map(|(bi, b)| (0..b.rows).map(move |r| (bi, r))).collect();
    data.par_chunks_mut(inp * PANEL).enumerate().for_each(|(p, panel)| {
        let mine = &rows[p * PANEL..rows.len().min((p + 1) * PANEL)];
        let mut run = [T::default(); PACK_COLS];
        for c0 in (0..inp).step_by(PACK_COLS) {
            let c1 = (c0 + PACK_COLS).min(inp);
            let run = &mut run[..c1 - c0];
            for (j, &(bi, r)) in mine.iter().enumerate() {
                let b = &blocks[bi];
                let size = b.dtype.float_size().expect("pack checked float dtypes");
                decode(b, &b.bytes[(r * inp + c0) * size..(r * inp + c1) * size], run);
                for (c, v) in run.iter().enumerate() {
                    panel[(c0 + c) * PANEL + j] = *v;
                }
            }
        }
    });
    data
}

thread_local! {
    /// Each thread's f32 copy of the narrow panel it is multiplying by.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn resize_wide(wide: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if wide.len() < n {
        wide.resize(n, 0.0);
    }
    &mut wide[..n]
}

/// bf16 → f32 (exact: the bf16 bits are the f32's upper half).
#[inline(always)]
fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((*s as u32) << 16);
    }
}
variants!(widen_bf16, widen_bf16_avx512, widen_bf16_avx2, (src: &[u16], dst: &mut [f32]));

/// Adds `x[:, c0..c0+kc] · chunk` to columns `p*PANEL ..` of `y` (assigns it for the first chunk,
/// `c0 == 0`): [`panel_avx512::product`] when `own` (the caller checked the CPU runs it), else one
/// single-threaded `gemm` call on rows `c0..c0+kc` of panel `p`.
///
/// # Safety
/// `chunk` holds `kc * PANEL` values with `c0 + kc <= k`; `x` holds `m * k` and `dst` points to `m * n`
/// values (row stride `n`). Each panel index writes only its own columns, so tasks for different `p` may
/// run at once; the chunks of one panel run in order.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    own: bool,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    p: usize,
    c0: usize,
    chunk: &[f32],
    dst: &SendPtr,
) {
    let width = PANEL.min(n - p * PANEL);
    let kc = chunk.len() / PANEL;
    debug_assert!(c0 + kc <= k && x.len() >= m * k);
    #[cfg(target_arch = "x86_64")]
    if own {
        // SAFETY: as below; `own` means the CPU has AVX-512F.
        unsafe { panel_avx512::product(x, m, k, c0, chunk, dst.0.add(p * PANEL), n, width) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = own; // only x86-64 has the AVX-512 kernel
    // SAFETY: task `p` writes only columns p*PANEL .. p*PANEL+width of the m rows of `y` (row stride n),
    // disjoint from every other task and inside `y`; it reads columns c0..c0+kc of `x` (m×k, row stride
    // k) and its own chunk (kc×PANEL, row stride PANEL, first `width` columns).
    unsafe {
        gemm::gemm(
            m,
            width,
            kc,
            dst.0.add(p * PANEL),
            1,
            n as isize,
            c0 > 0,
            x.as_ptr().add(c0),
            1,
            k as isize,
            chunk.as_ptr(),
            1,
            PANEL as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// For `cargo xtask bench kernel`: the speed (GFLOP/s, one thread, best of 3 rounds of at least 0.2 s)
/// of `[m, k] x [k, n]` on the same f32 panels by `gemm` and by the AVX-512 panel kernel (`None` where
/// the CPU lacks AVX-512F).
#[doc(hidden)]
pub fn panel_kernel_speeds(m: usize, k: usize, n: usize) -> (f64, Option<f64>) {
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 255) as f32 / 128.0 - 1.0).collect();
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = Panels::pack(&[RowBlock { bytes: &bytes, dtype: checkpoint::Dtype::F32, rows: n }], k, Held::F32);
    let Store::F32(data) = &p.store else { unreachable!("packed as f32") };
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut y = vec![0f32; m * n];
    let flop = 2.0 * (m * k * n) as f64;
    let mut speed = |own: bool| {
        let dst = SendPtr(y.as_mut_ptr());
        let mut best = 0f64;
        for _ in 0..3 {
            let (start, mut reps) = (std::time::Instant::now(), 0u32);
            while reps == 0 || start.elapsed().as_secs_f64() < 0.2 {
                for (i, panel) in data.chunks(k * PANEL).enumerate() {
                    // SAFETY: `panel_product`'s contract: one thread, whole panels, `x` and `y` sized above.
                    unsafe { panel_product(own, &x, m, k, n, i, 0, panel, &dst) }
                }
                reps += 1;
            }
            best = best.max(flop * reps as f64 / start.elapsed().as_secs_f64() / 1e9);
        }
        best
    };
    let gemm = speed(false);
    (gemm, panel_avx512::available().then(|| speed(true)))
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
#[inline(always)]
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
#[inline(always)]
pub fn rms_norm_row(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let r = 1.0f32 / (mean_square(x) + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(g) {
        *o = (v * r) * w;
    }
}

/// RMSNorm of one row in place.
#[inline(always)]
pub fn rms_norm_row_inplace(x: &mut [f32], g: &[f32], eps: f32) {
    let r = 1.0f32 / (mean_square(x) + eps).sqrt();
    for (v, w) in x.iter_mut().zip(g) {
        *v = (*v * r) * w;
    }
}

/// RMSNorm of every row of `x` (`[rows, d]`) into `out`.
pub fn rms_norm(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let d = g.len();
    let simd = Simd::detect();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, x)| dispatch!(simd, rms_norm_row, rms_norm_row_avx512, rms_norm_row_avx2, (x, g, eps, o)));
}
variants!(rms_norm_row, rms_norm_row_avx512, rms_norm_row_avx2, (x: &[f32], g: &[f32], eps: f32, out: &mut [f32]));

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], g: &[f32], eps: f32) {
    let d = g.len();
    let simd = Simd::detect();
    x.par_chunks_mut(d).with_min_len(MIN_ROWS).for_each(|row| {
        dispatch!(simd, rms_norm_row_inplace, rms_norm_row_inplace_avx512, rms_norm_row_inplace_avx2, (row, g, eps))
    });
}
variants!(
    rms_norm_row_inplace,
    rms_norm_row_inplace_avx512,
    rms_norm_row_inplace_avx2,
    (x: &mut [f32], g: &[f32], eps: f32)
);

/// `x += y`, element-wise.
pub fn add_inplace(x: &mut [f32], y: &[f32], d: usize) {
    x.par_chunks_mut(d).zip(y.par_chunks(d)).with_min_len(MIN_ROWS).for_each(|(x, y)| {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
    });
}

/// `e^x` in f32 within about an ulp (Cephes' `expf`: `2^n · p(r)`, `|r| <= ln 2 / 2`; its last coefficient,
/// 5.0000001201e-1, is 0.5 in f32), written so that
/// the compiler vectorises it. Results above `e^88` are `inf`, below the smallest normal 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.0;
    const LO: f32 = -87.336_55;
    // Rounds to nearest (ties to even) for |v| < 2^22.
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let n = (xc * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = (xc - n * C1) - n * C2;
    let z = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5)
        * z
        + r
        + 1.0;
    let v = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        v
    }
}

#[inline(always)]
fn activate(a: Activation, x: f32) -> f32 {
    match a {
        // torch's silu: x / (1 + exp(-x)).
        Activation::Silu => x / (1.0 + exp_f32(-x)),
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
    let simd = Simd::detect();
    out.par_chunks_mut(ff)
        .zip(gate_up.par_chunks(2 * ff))
        .with_min_len(MIN_ROWS)
        .for_each(|(o, gu)| dispatch!(simd, gated_row, gated_row_avx512, gated_row_avx2, (gu, a, o)));
}

#[inline(always)]
fn gated_row(gate_up: &[f32], a: Activation, out: &mut [f32]) {
    let (g, u) = gate_up.split_at(out.len());
    // One loop per activation, so that each vectorises on its own.
    match a {
        Activation::Silu => {
            for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                *o = activate(Activation::Silu, *g) * u;
            }
        }
        _ => {
            for ((o, g), u) in out.iter_mut().zip(g).zip(u) {
                *o = activate(a, *g) * u;
            }
        }
    }
}
variants!(gated_row, gated_row_avx512, gated_row_avx2, (gate_up: &[f32], a: Activation, out: &mut [f32]));

/// `tanh(x / cap) * cap`, as Gemma 2/3 soft-cap scores and logits.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// Softmax of one row in place (max-subtracted, f32 like torch's `softmax(dtype=float32)`).
#[inline(always)]
pub fn softmax_row(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp_f32(*v - max);
    }
    for v in x.iter() {
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Keys and values one prompt's queries attend to. Keys are transposed: component `c` (of
/// `kv_heads * head_dim`) of the key at position `j` is `kt[c * kt_stride + j]`; the value at position `j`
/// is `v[j * v_stride..][..kv_width]`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub kt: &'a [f32],
    pub kt_stride: usize,
    pub v: &'a [f32],
    pub v_stride: usize,
    /// Number of positions (`0..n`).
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
    let simd = Simd::detect();
    out.par_chunks_mut(p.heads * p.head_dim).enumerate().for_each(|(t, o)| {
        let view = kv[segment[t] as usize];
        let qrow = &q[t * q_stride..][..p.heads * p.head_dim];
        let pos = position[t] as usize;
        dispatch!(simd, attend, attend_avx512, attend_avx2, (qrow, pos, view, p, o))
    });
}

variants!(attend, attend_avx512, attend_avx2, (q: &[f32], pos: usize, view: KvView<'_>, p: &AttnParams, o: &mut [f32]));

/// `acc += w * v` on one register-sized block.
#[inline(always)]
fn axpy(acc: &mut [f32; LANES], w: f32, v: &[f32; LANES]) {
    for i in 0..LANES {
        acc[i] += w * v[i];
    }
}

/// Attention of one query row (all heads) at position `pos` over keys `0..=pos` (within the window).
#[inline(always)]
fn attend(q: &[f32], pos: usize, view: KvView<'_>, p: &AttnParams, o: &mut [f32]) {
    let hd = p.head_dim;
    let group = p.heads / p.kv_heads;
    let hi = pos + 1;
    let lo = match p.window {
        Some(w) => hi.saturating_sub(w),
        None => 0,
    };
    debug_assert!(hi <= view.n, "a query never attends past its prompt's keys");
    let mut scores = vec![0f32; hi - lo];
    for h in 0..p.heads {
        let g = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        // q·k for every key, vectorised over keys (keys are stored transposed).
        weighted_sums(qh, &view.kt[g * hd * view.kt_stride..], view.kt_stride, lo, &mut scores);
        match p.scale {
            ScoreScale::Mul(m) => scores.iter_mut().for_each(|s| *s *= m),
            ScoreScale::Div(d) => scores.iter_mut().for_each(|s| *s /= d),
        }
        if let Some(cap) = p.softcap {
            scores.iter_mut().for_each(|s| *s = softcap(*s, cap));
        }
        softmax_row(&mut scores);
        // The weighted sum of the values.
        let oh = &mut o[h * hd..(h + 1) * hd];
        weighted_sums(&scores, &view.v[lo * view.v_stride..], view.v_stride, g * hd, oh);
    }
}

/// `out[i] = Σ_t w[t] · base[t * stride + offset + i]`, each sum over `t` in order (so every value is the
/// same however the blocks fall), in register blocks of 4 × 16 lanes: four independent accumulations
/// keep the adder busy where one would wait on its own latency.
#[inline(always)]
fn weighted_sums(w: &[f32], base: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    let n = out.len();
    let mut i = 0;
    while n - i >= 4 * LANES {
        weighted_block::<4>(w, base, stride, offset + i, &mut out[i..i + 4 * LANES]);
        i += 4 * LANES;
    }
    while n - i >= LANES {
        weighted_block::<1>(w, base, stride, offset + i, &mut out[i..i + LANES]);
        i += LANES;
    }
    // A last partial block: as a whole block where the memory after it is readable (callers pad key
    // rows to a multiple of LANES), its extra lanes dropped; the lanes are independent.
    if i < n && !w.is_empty() && (w.len() - 1) * stride + offset + i + LANES <= base.len() {
        let mut tmp = [0f32; LANES];
        weighted_block::<1>(w, base, stride, offset + i, &mut tmp);
        out[i..].copy_from_slice(&tmp[..n - i]);
        return;
    }
    for (r, o) in out.iter_mut().enumerate().skip(i) {
        let mut acc = 0f32;
        for (t, &wt) in w.iter().enumerate() {
            acc += wt * base[t * stride + offset + r];
        }
        *o = acc;
    }
}

#[inline(always)]
fn weighted_block<const B: usize>(w: &[f32], base: &[f32], stride: usize, offset: usize, out: &mut [f32]) {
    let mut acc = [[0f32; LANES]; B];
    for (t, &wt) in w.iter().enumerate() {
        let src = &base[t * stride + offset..][..B * LANES];
        for (b, a) in acc.iter_mut().enumerate() {
            axpy(a, wt, src[b * LANES..][..LANES].try_into().expect("LANES values"));
        }
    }
    for (b, a) in acc.iter().enumerate() {
        out[b * LANES..][..LANES].copy_from_slice(a);
    }
}

/// `log softmax(z)[t] = z[t] − logsumexp(z)`: each `exp(z_v − max)` in f32 (the logits' own precision;
/// relative error ~1e-7), summed in f64 in a fixed order (method.md §8, cross-entropy).
pub fn log_softmax_at(z: &[f32], t: usize) -> f64 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = z.iter().map(|&v| (v - max).exp() as f64).sum();
    z[t] as f64 - max as f64 - sum.ln()
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

    /// On AVX-512 every product is one chain of fused multiply-adds per output value over the inner
    /// dimension in order (the same bits as `f32::mul_add` folded from 0), so a row gives the same bits
    /// whatever rows it is computed with; also past one `K_CHUNK`, in a last panel narrower than
    /// `PANEL`, and from bf16 panels.
    #[test]
    fn avx512_products_are_one_fused_chain_per_value_whatever_the_other_rows() {
        if !panel_avx512::available() {
            eprintln!("skipped: this CPU has no AVX-512F, so products run gemm (no such promise)");
            return;
        }
        for (m, k, n) in [(1, 7, 3), (13, 300, 130), (64, 576, 64), (200, 96, 70), (7, K_CHUNK + 70, 65)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            // bf16-exact weights, so the bf16-held matrix holds the same values.
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 255) as f32 / 128.0 - 1.0).collect();
            let chain: Vec<f32> = (0..m * n)
                .map(|o| {
                    let (i, j) = (o / n, o % n);
                    (0..k).fold(0f32, |acc, c| x[i * k + c].mul_add(w[j * k + c], acc))
                })
                .collect();
            let p = Panels::from_rows(&w, n, k);
            let mut all = vec![f32::NAN; m * n];
            p.matmul(&x, m, &mut all);
            assert_eq!(all, chain, "({m}, {k}, {n})");
            for i in [0, m / 2, m - 1] {
                let mut one = vec![f32::NAN; n];
                p.matmul(&x[i * k..(i + 1) * k], 1, &mut one);
                assert_eq!(one, chain[i * n..(i + 1) * n], "row {i} alone ({m}, {k}, {n})");
            }
            let bytes: Vec<u8> = w.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
            let narrow =
                Panels::pack(&[RowBlock { bytes: &bytes, dtype: checkpoint::Dtype::BF16, rows: n }], k, Held::Bf16);
            let mut out = vec![f32::NAN; m * n];
            narrow.matmul(&x, m, &mut out);
            assert_eq!(out, chain, "bf16 ({m}, {k}, {n})");
        }
    }

    /// Matrices held as bf16 or f16 give the same bits as the same values held as f32, also past one
    /// `K_CHUNK` of inner dimension, stacked from blocks of different dtypes, and match a naive product.
    #[test]
    fn narrow_panels_give_the_same_bits_as_f32_panels() {
        use checkpoint::Dtype;
        fn block(bytes: &[u8], dtype: Dtype, rows: usize) -> RowBlock<'_> {
            RowBlock { bytes, dtype, rows }
        }
        for (m, k, n) in [(1, 70, 3), (5, 2 * K_CHUNK + 100, 130), (40, 300, 64)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            // Values exact in both bf16 and f16: small integers over 256.
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 255) as f32 / 256.0 - 0.5).collect();
            let bf16: Vec<u8> = w.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
            let f16: Vec<u8> = w.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect();
            let f32s: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let product = |p: Panels| {
                let mut y = vec![f32::NAN; m * n];
                p.matmul(&x, m, &mut y);
                y
            };
            let want = product(Panels::pack(&[block(&f32s, Dtype::F32, n)], k, Held::F32));
            let diff = want.iter().zip(naive(&x, m, k, &w, n)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "({m}, {k}, {n}): {diff}");
            assert_eq!(product(Panels::pack(&[block(&bf16, Dtype::BF16, n)], k, Held::Bf16)), want, "bf16");
            assert_eq!(product(Panels::pack(&[block(&f16, Dtype::F16, n)], k, Held::F16)), want, "f16");
            assert_eq!(product(Panels::pack(&[block(&bf16, Dtype::BF16, n)], k, Held::F32)), want, "bf16 as f32");
            // Two blocks stacked (as q/k/v are), one stored as f16 and one as f32.
            let split = n / 2;
            let (a, b) = (&f16[..split * k * 2], &f32s[split * k * 4..]);
            let stacked = [block(a, Dtype::F16, split), block(b, Dtype::F32, n - split)];
            assert_eq!(product(Panels::pack(&stacked, k, Held::F32)), want, "stacked");
        }
    }

    #[test]
    fn exp_is_within_two_ulps_and_saturates() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The AVX-512, AVX2 and baseline builds of each row kernel give the same bits (checked for the
    /// instruction sets this CPU has).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let simd = Simd::detect();
        let v = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| (((i + seed) * 7919) % 1013) as f32 / 101.3 - 5.0).collect()
        };
        let (x, g) = (v(576, 1), v(576, 2));
        let (mut a, mut b) = (vec![0f32; 576], vec![0f32; 576]);
        rms_norm_row(&x, &g, 1e-5, &mut a);
        dispatch!(simd, rms_norm_row, rms_norm_row_avx512, rms_norm_row_avx2, (&x, &g, 1e-5, &mut b));
        assert_eq!(a, b, "rms_norm_row");
        let gu = v(2 * 300, 3);
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu, Activation::Relu] {
            let (mut a, mut b) = (vec![0f32; 300], vec![0f32; 300]);
            gated_row(&gu, act, &mut a);
            dispatch!(simd, gated_row, gated_row_avx512, gated_row_avx2, (&gu, act, &mut b));
            assert_eq!(a, b, "{act:?}");
        }
        let (k, vals, q) = (v(64 * 40, 4), v(40 * 64, 6), v(6 * 32, 5));
        let view = KvView { kt: &k, kt_stride: 40, v: &vals, v_stride: 64, n: 40 };
        let p = AttnParams {
            heads: 6,
            kv_heads: 2,
            head_dim: 32,
            scale: ScoreScale::Mul(0.17),
            softcap: Some(20.0),
            window: Some(30),
        };
        let (mut a, mut b) = (vec![0f32; 192], vec![0f32; 192]);
        attend(&q, 39, view, &p, &mut a);
        dispatch!(simd, attend, attend_avx512, attend_avx2, (&q, 39, view, &p, &mut b));
        assert_eq!(a, b, "attend");
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
        // Two positions, one head of dim 2: keys (1, 0) and (0, 1) transposed, values stored [v] per row.
        let kt = [1.0f32, 0.0, 0.0, 1.0];
        let values = [10.0f32, 20.0, 30.0, 40.0];
        let view = KvView { kt: &kt, kt_stride: 2, v: &values, v_stride: 2, n: 2 };
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
