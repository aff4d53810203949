//! Element types of safetensors tensors, and the exact conversions between stored floats and
//! f32/f64 that the edit and the runtime rely on (method.md §6, numerical recipe).
//!
//! Conversions to f32 are exact for bf16 and f16. Conversions from f64 round once, to nearest even.

use std::fmt;

/// A safetensors element type, named as in the file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    F4,
    F6E2M3,
    F6E3M2,
}

impl Dtype {
    /// Parses the dtype string of a safetensors header (`"BF16"`, `"F32"`, ...).
    pub fn from_safetensors(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F4" => Dtype::F4,
            "F6_E2M3" => Dtype::F6E2M3,
            "F6_E3M2" => Dtype::F6E3M2,
            _ => return None,
        })
    }

    /// The name used in safetensors headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
        }
    }

    /// Size of one element in bits (sub-byte types pack several elements per byte).
    pub fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// True for the float types we can decode, compute on and write back: F16, BF16, F32, F64.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// Bytes per element for the float types of [`Dtype::is_float`].
    pub fn float_size(self) -> Option<usize> {
        self.is_float().then(|| self.bits() / 8)
    }

    /// Unit roundoff `u` of a float type (method.md §6, laws): 2^-8 bf16, 2^-11 f16, 2^-24 f32.
    pub fn unit_roundoff(self) -> Option<f64> {
        match self {
            Dtype::BF16 => Some(2f64.powi(-8)),
            Dtype::F16 => Some(2f64.powi(-11)),
            Dtype::F32 => Some(2f64.powi(-24)),
            Dtype::F64 => Some(2f64.powi(-53)),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Decodes little-endian float elements into `out` as f32 (exact for F16/BF16/F32; F64 rounds).
///
/// `bytes.len()` must be `out.len() * size`; a violated length is a caller bug, so it panics.
pub fn decode_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let size = dtype.float_size().expect("decode_f32 needs a float dtype; callers check is_float");
    assert_eq!(bytes.len(), out.len() * size, "decode_f32: byte length must match element count");
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunks_exact(8)")) as f32;
            }
        }
        _ => unreachable!("float_size() admits only float dtypes"),
    }
}

/// Decodes little-endian float elements into `out` as f64 (exact for every float dtype).
pub fn decode_f64(dtype: Dtype, bytes: &[u8], out: &mut [f64]) {
    let size = dtype.float_size().expect("decode_f64 needs a float dtype; callers check is_float");
    assert_eq!(bytes.len(), out.len() * size, "decode_f64: byte length must match element count");
    match dtype {
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("chunks_exact(8)"));
            }
        }
        // Directly, with no temporary buffer: callers decode in small pieces on hot paths.
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64;
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
            }
        }
        _ => unreachable!("float_size() admits only float dtypes"),
    }
}

/// Rounds f64 values once to `dtype` (round to nearest, ties to even) and appends their
/// little-endian bytes to `out`.
///
/// f64 -> bf16 and f64 -> f16 are done directly from the f64 value, not through f32, so there is
/// exactly one rounding (a double rounding through f32 can differ in rare ties).
pub fn encode_f64(dtype: Dtype, values: &[f64], out: &mut Vec<u8>) {
    match dtype {
        Dtype::F64 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F32 => values.iter().for_each(|&v| out.extend_from_slice(&(v as f32).to_le_bytes())),
        Dtype::BF16 => values.iter().for_each(|&v| out.extend_from_slice(&bf16_from_f64(v).to_le_bytes())),
        Dtype::F16 => values.iter().for_each(|&v| out.extend_from_slice(&f16_from_f64(v).to_le_bytes())),
        other => panic!("encode_f64: {other} is not a float dtype; callers check is_float"),
    }
}

/// Rounds an f64 to bfloat16 bits with round-to-nearest-even, in one step.
///
/// NaN stays NaN (quiet); values beyond the largest finite bf16 round to infinity as IEEE does.
pub fn bf16_from_f64(v: f64) -> u16 {
    if v.is_nan() {
        return 0x7fc0 | (((v.to_bits() >> 63) as u16) << 15);
    }
    let bits = f32_sticky(v).to_bits();
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// Rounds an f64 to IEEE half-precision bits with round-to-nearest-even, in one step.
pub fn f16_from_f64(v: f64) -> u16 {
    // half's own f64 path may go through f32 in hardware (two roundings); the sticky f32 keeps
    // the single-rounding result because f16 has far fewer mantissa bits than f32.
    half::f16::from_f32(f32_sticky(v)).to_bits()
}

/// `v` truncated toward zero to f32 precision, with the lowest mantissa bit set when inexact
/// (a "sticky" bit). Rounding this f32 to any narrower format gives the correctly rounded
/// result of `v` itself, so f64 -> bf16/f16 is a single rounding.
fn f32_sticky(v: f64) -> f32 {
    let f = v as f32;
    if f as f64 == v || !f.is_finite() {
        return f;
    }
    let mut bits = f.to_bits();
    if (f as f64).abs() > v.abs() {
        bits -= 1; // `as` rounded away from zero: step back toward zero (sign-magnitude)
    }
    f32::from_bits(bits | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even_from_f64() {
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even -> 1.0.
        assert_eq!(bf16_from_f64(1.0 + 2f64.powi(-8)), 0x3f80);
        // Slightly above the tie rounds up; the excess is below f32 precision, so a double
        // rounding through f32 would wrongly give 1.0 here.
        assert_eq!(bf16_from_f64(1.0 + 2f64.powi(-8) + 2f64.powi(-40)), 0x3f81);
        // 1 + 3*2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even): up.
        assert_eq!(bf16_from_f64(1.0 + 3.0 * 2f64.powi(-8)), 0x3f82);
        assert_eq!(bf16_from_f64(-2.0), 0xc000);
        assert_eq!(bf16_from_f64(f64::INFINITY), 0x7f80);
        assert_eq!(bf16_from_f64(1e300), 0x7f80);
        assert_eq!(bf16_from_f64(0.0), 0);
        assert_eq!(bf16_from_f64(-0.0), 0x8000);
        assert!(f32::from_bits((bf16_from_f64(f64::NAN) as u32) << 16).is_nan());
    }

    #[test]
    fn bf16_matches_half_for_values_exact_in_f32() {
        // For values exactly representable in f32, one rounding f32 -> bf16 is the reference.
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let f = f32::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            assert_eq!(bf16_from_f64(f as f64), half::bf16::from_f32(f).to_bits(), "{f:e}");
        }
    }

    #[test]
    fn f16_rounding_is_single_from_f64() {
        // 1 + 2^-11 is the tie between f16 1.0 and 1 + 2^-10: even -> 1.0; a hair above -> up.
        assert_eq!(f16_from_f64(1.0 + 2f64.powi(-11)), 0x3c00);
        assert_eq!(f16_from_f64(1.0 + 2f64.powi(-11) + 2f64.powi(-45)), 0x3c01);
        assert_eq!(f16_from_f64(65504.0), 0x7bff);
        assert_eq!(f16_from_f64(1e6), 0x7c00);
    }

    #[test]
    fn decode_roundtrips_every_float_dtype() {
        let vals = [1.5f64, -0.25, 3072.0, 0.0];
        for dt in [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64] {
            let mut bytes = Vec::new();
            encode_f64(dt, &vals, &mut bytes);
            let mut back = [0f64; 4];
            decode_f64(dt, &bytes, &mut back);
            assert_eq!(back, vals, "{dt}");
        }
    }
}
