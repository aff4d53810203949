//! Directions in other tools' formats (docs/variants.md, "Interchange"):
//!
//! - **llama.cpp control vectors** (GGUF): one F32 1-D tensor `direction.N` of length `n_embd` per layer
//!   `N >= 1`, metadata `general.architecture = "controlvector"`, `controlvector.model_hint` (the model's
//!   architecture) and `controlvector.layer_count` (i32, the number of tensors), as llama.cpp's
//!   `cvector-generator` writes them. llama.cpp (`common_control_vector_load_one`, `llama_adapter_cvec`)
//!   adds `strength · direction.N` to the output of block `N` (0-based), which is our residual entering layer
//!   `N + 1`; `direction.0` is refused by its loader. So a direction of ours at residual `ℓ` is written as
//!   `direction.(ℓ − 1)`, and read back at `ℓ = N + 1`.
//! - **`.npy`** arrays (NumPy format 1.0-3.0, little-endian `<f4`/`<f8`, C order) and tensors of other
//!   tools' `.safetensors` files, 1-D or 2-D.
//!
//! Every byte of a file read is validated with checked arithmetic before use; errors name the problem.

use std::collections::BTreeMap;

/// GGUF value types (the GGUF specification).
const GGUF_U8: u32 = 0;
const GGUF_I8: u32 = 1;
const GGUF_U16: u32 = 2;
const GGUF_I16: u32 = 3;
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_BOOL: u32 = 7;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
const GGUF_U64: u32 = 10;
const GGUF_I64: u32 = 11;
const GGUF_F64: u32 = 12;
/// ggml's type id of F32 tensors.
const GGML_F32: u32 = 0;
/// GGUF's default alignment of the data section and of every tensor in it.
const ALIGNMENT: u64 = 32;

/// A control vector: `direction.N` -> values (f32, as stored), and the model hint.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlVector {
    pub model_hint: String,
    /// Layer `N` of `direction.N` (>= 1) -> its vector.
    pub layers: BTreeMap<usize, Vec<f32>>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad_to(out: &mut Vec<u8>, align: u64) {
    while !(out.len() as u64).is_multiple_of(align) {
        out.push(0);
    }
}

impl ControlVector {
    /// The GGUF bytes, laid out as llama.cpp's `gguf_write_to_file` lays them out (GGUF v3, the key/values
    /// `general.architecture`, `controlvector.model_hint`, `controlvector.layer_count`, tensors in
    /// increasing `N`, data aligned to 32 bytes).
    pub fn to_gguf(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.layers.len() as u64).to_le_bytes());
        out.extend_from_slice(&3u64.to_le_bytes());
        put_str(&mut out, "general.architecture");
        out.extend_from_slice(&GGUF_STRING.to_le_bytes());
        put_str(&mut out, "controlvector");
        put_str(&mut out, "controlvector.model_hint");
        out.extend_from_slice(&GGUF_STRING.to_le_bytes());
        put_str(&mut out, &self.model_hint);
        put_str(&mut out, "controlvector.layer_count");
        out.extend_from_slice(&GGUF_I32.to_le_bytes());
        out.extend_from_slice(&(self.layers.len() as i32).to_le_bytes());
        let mut offset = 0u64;
        for (n, v) in &self.layers {
            put_str(&mut out, &format!("direction.{n}"));
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            out.extend_from_slice(&GGML_F32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (v.len() as u64 * 4).next_multiple_of(ALIGNMENT);
        }
        pad_to(&mut out, ALIGNMENT);
        for v in self.layers.values() {
            let start = out.len() as u64;
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
            let end = start + (v.len() as u64 * 4).next_multiple_of(ALIGNMENT);
            out.resize(end as usize, 0);
        }
        out
    }

    /// Reads a control-vector GGUF (v2 or v3): every tensor must be an F32 1-D `direction.N` with `N >= 1`,
    /// all of one length (what llama.cpp's loader accepts). Other key/values are skipped.
    pub fn from_gguf(bytes: &[u8]) -> Result<ControlVector, String> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(4)? != b"GGUF" {
            return Err("not a GGUF file (no `GGUF` magic)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 or 3)"));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut model_hint = String::new();
        let mut alignment = ALIGNMENT;
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            match (key.as_str(), ty) {
                ("controlvector.model_hint", GGUF_STRING) => model_hint = r.string()?,
                ("general.alignment", GGUF_U32) => {
                    alignment = r.u32()? as u64;
                    if alignment == 0 || !alignment.is_power_of_two() {
                        return Err(format!("general.alignment {alignment} is not a power of two"));
                    }
                }
                _ => r.skip_value(ty, 0)?,
            }
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(format!("tensor `{name}` has {n_dims} dimensions"));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            let ty = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = (r.at as u64).next_multiple_of(alignment);
        let mut layers = BTreeMap::new();
        let mut n_embd = None;
        for (name, dims, ty, offset) in infos {
            let n: usize = name
                .strip_prefix("direction.")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("tensor `{name}` is not `direction.N` (llama.cpp's loader refuses it)"))?;
            if n == 0 {
                return Err("tensor `direction.0`: layer 0 is refused by llama.cpp's loader".into());
            }
            if ty != GGML_F32 || dims.len() != 1 {
                return Err(format!("tensor `{name}` must be F32 and 1-D (type {ty}, dims {dims:?})"));
            }
            let len = dims[0];
            if *n_embd.get_or_insert(len) != len {
                return Err(format!("tensor `{name}` has length {len}, another has {}", n_embd.unwrap_or(0)));
            }
            let start = data_start.checked_add(offset).ok_or("tensor offset overflows")?;
            let end = start.checked_add(len.checked_mul(4).ok_or("tensor size overflows")?).ok_or("overflow")?;
            if end > bytes.len() as u64 {
                return Err(format!("tensor `{name}` lies past the end of the file"));
            }
            let v: Vec<f32> = bytes[start as usize..end as usize]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("tensor `{name}` has a NaN or infinite value"));
            }
            if layers.insert(n, v).is_some() {
                return Err(format!("tensor `{name}` appears twice"));
            }
        }
        if layers.is_empty() {
            return Err("holds no `direction.N` tensor".into());
        }
        Ok(ControlVector { model_hint, layers })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("truncated GGUF file")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = usize::try_from(self.u64()?).map_err(|_| "string length overflows")?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a GGUF string is not UTF-8".to_string())
    }
    fn skip_value(&mut self, ty: u32, depth: usize) -> Result<(), String> {
        let size = match ty {
            GGUF_U8 | GGUF_I8 | GGUF_BOOL => 1,
            GGUF_U16 | GGUF_I16 => 2,
            GGUF_U32 | GGUF_I32 | GGUF_F32 => 4,
            GGUF_U64 | GGUF_I64 | GGUF_F64 => 8,
            GGUF_STRING => {
                self.string()?;
                return Ok(());
            }
            GGUF_ARRAY if depth < 4 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(inner, depth + 1)?;
                }
                return Ok(());
            }
            other => return Err(format!("unknown GGUF value type {other}")),
        };
        self.take(size).map(|_| ())
    }
}

/// A `.npy` array of floats: its shape and values (f64; `<f4` widened exactly).
pub fn read_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f64>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no `\\x93NUMPY` magic)".into());
    }
    let major = bytes[6];
    let (len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        _ => return Err(format!(".npy format version {major} is not supported")),
    };
    let end = start.checked_add(len).filter(|&e| e <= bytes.len()).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| ".npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or(".npy header has no 'descr'")?;
    let size = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(format!(".npy dtype {} is not <f4 or <f8", descr.split(',').next().unwrap_or("?")));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(".npy array in Fortran order is not supported (save it C-contiguous)".into());
    }
    let shape_text = field("shape").ok_or(".npy header has no 'shape'")?;
    let inner = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or(".npy shape is not a tuple")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!(".npy shape entry `{s}` is not a number")))
        .collect::<Result<_, _>>()?;
    let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or(".npy shape overflows")?;
    let data = &bytes[end..];
    if data.len() != numel * size {
        return Err(format!(".npy holds {} data bytes but shape {shape:?} needs {}", data.len(), numel * size));
    }
    let values: Vec<f64> = if size == 4 {
        data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
    } else {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    };
    if values.iter().any(|x| !x.is_finite()) {
        return Err(".npy array has a NaN or infinite value".into());
    }
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_vectors_round_trip() {
        let cv = ControlVector {
            model_hint: "llama".into(),
            layers: [(1, vec![1.0, -2.0, 0.5]), (4, vec![0.25, 0.0, 3.0])].into_iter().collect(),
        };
        let bytes = cv.to_gguf();
        assert_eq!(bytes.len() % 32, 0);
        assert_eq!(ControlVector::from_gguf(&bytes).unwrap(), cv);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(ControlVector::from_gguf(&bad).unwrap_err(), "not a GGUF file (no `GGUF` magic)");
        assert_eq!(ControlVector::from_gguf(&bytes[..60]).unwrap_err(), "truncated GGUF file");
    }

    /// fixtures/directions/control_vector.gguf was written by gguf-py's GGUFWriter (llama.cpp's own writer,
    /// make_control_vector.py): ours must give the same bytes, and read them back.
    #[test]
    fn control_vector_bytes_equal_gguf_py() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/directions/control_vector.gguf");
        let want = std::fs::read(path).unwrap();
        let cv = ControlVector {
            model_hint: "llama".into(),
            layers: [(1, vec![0.5, -1.25, 2.0, 0.0, 3.5]), (3, vec![-0.75, 0.125, 1.0, -2.0, 0.25])]
                .into_iter()
                .collect(),
        };
        assert_eq!(cv.to_gguf(), want);
        assert_eq!(ControlVector::from_gguf(&want).unwrap(), cv);
    }

    #[test]
    fn npy_reads_f4_and_f8() {
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
        let mut h = h.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for x in [1.0f32, 2.0, 3.0, 4.5] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(read_npy(&b).unwrap(), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.5]));
        assert_eq!(read_npy(&b[..b.len() - 4]).unwrap_err(), ".npy holds 12 data bytes but shape [2, 2] needs 16");
    }
}
