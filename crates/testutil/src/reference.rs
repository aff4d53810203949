//! Reading reference data in tests: safetensors files written by the committed Python scripts (numpy,
//! PyTorch), decoded to f32 and i32 tensors with their metadata, and small comparison helpers.

use std::collections::HashMap;
use std::path::Path;

use checkpoint::{Dtype, dtype, safetensors};

/// The tensors of one reference file, decoded.
pub struct Reference {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i32s: HashMap<String, (Vec<usize>, Vec<i32>)>,
    pub metadata: HashMap<String, String>,
}

impl Reference {
    pub fn open(path: &Path) -> Reference {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading `{}`: {e}", path.display()));
        let header = safetensors::parse(&bytes).expect("a valid safetensors file");
        let start = header.data_start();
        let mut f32s = HashMap::new();
        let mut i32s = HashMap::new();
        for t in &header.tensors {
            let raw = &bytes[start + t.begin..start + t.end];
            match t.dtype {
                Dtype::I32 => {
                    let v = raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
                    i32s.insert(t.name.clone(), (t.shape.clone(), v));
                }
                Dtype::I64 => {
                    let v = raw
                        .chunks_exact(8)
                        .map(|c| i32::try_from(i64::from_le_bytes(c.try_into().unwrap())).expect("ids fit in i32"))
                        .collect();
                    i32s.insert(t.name.clone(), (t.shape.clone(), v));
                }
                d if d.is_float() => {
                    let mut v = vec![0f32; t.numel()];
                    dtype::decode_f32(d, raw, &mut v);
                    f32s.insert(t.name.clone(), (t.shape.clone(), v));
                }
                d => panic!("unexpected dtype {d} for `{}`", t.name),
            }
        }
        let metadata = header
            .metadata
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
            .collect();
        Reference { f32s, i32s, metadata }
    }

    pub fn f32(&self, name: &str) -> (&[usize], &[f32]) {
        let (s, v) = self.f32s.get(name).unwrap_or_else(|| panic!("no f32 tensor `{name}`"));
        (s, v)
    }

    /// An integer tensor (I32, or I64 narrowed).
    pub fn i32(&self, name: &str) -> (&[usize], &[i32]) {
        let (s, v) = self.i32s.get(name).unwrap_or_else(|| panic!("no i32 tensor `{name}`"));
        (s, v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.f32s.contains_key(name) || self.i32s.contains_key(name)
    }

    /// Prompts stored as `{prefix}.input_ids` + `{prefix}.offsets`.
    pub fn prompts(&self, prefix: &str) -> Vec<Vec<u32>> {
        let (_, ids) = self.i32(&format!("{prefix}.input_ids"));
        let (_, off) = self.i32(&format!("{prefix}.offsets"));
        off.windows(2).map(|w| ids[w[0] as usize..w[1] as usize].iter().map(|&t| t as u32).collect()).collect()
    }
}

/// max |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

/// Integer ids as token ids.
pub fn ids(v: &[i32]) -> Vec<u32> {
    v.iter().map(|&t| u32::try_from(t).expect("non-negative ids")).collect()
}
