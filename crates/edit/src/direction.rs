//! Direction files, shared by `find` (which writes them) and `edit`/`diff`/hooks (which read them).
//!
//! A direction file is a safetensors file holding a 1-D tensor `direction` of length hidden_size
//! (F32 or F64, any norm: the raw difference in means of method.md §4) and string metadata
//! (`layer`, `position`, `source`, ...). Everything in it is validated before use.

use std::path::{Path, PathBuf};

use checkpoint::{Dtype, dtype, safetensors};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The name of the tensor in a direction file.
pub const TENSOR: &str = "direction";

/// A validated direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// The raw vector as stored (F32 widened exactly to f64).
    pub values: Vec<f64>,
    pub dtype: Dtype,
    /// `__metadata__` of the file.
    pub metadata: Map<String, Value>,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectionError {
    // Not a `source` field: the message already says it, and `{:#}` would print it twice.
    #[error("direction file `{}`: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("direction file `{}`: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
}

impl Direction {
    /// Reads and validates a direction file for a model with `hidden_size`.
    pub fn load(path: &Path, hidden_size: usize) -> Result<Direction, DirectionError> {
        let bytes = std::fs::read(path).map_err(|cause| DirectionError::Io { path: path.to_path_buf(), cause })?;
        let bad = |problem: String| DirectionError::Invalid { path: path.to_path_buf(), problem };
        let header = safetensors::parse(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let t = header.tensors.iter().find(|t| t.name == TENSOR).ok_or_else(|| {
            let names: Vec<_> = header.tensors.iter().map(|t| format!("`{}`", t.name)).collect();
            bad(format!(
                "has no tensor `{TENSOR}` (found {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ))
        })?;
        if t.shape.len() != 1 {
            return Err(bad(format!("`{TENSOR}` must be 1-D, found shape {:?}", t.shape)));
        }
        if !matches!(t.dtype, Dtype::F32 | Dtype::F64) {
            return Err(bad(format!("`{TENSOR}` has dtype {}; F32 or F64 expected", t.dtype)));
        }
        if t.shape[0] != hidden_size {
            return Err(bad(format!(
                "`{TENSOR}` has length {} but the model's hidden_size is {hidden_size}",
                t.shape[0]
            )));
        }
        let start = header.data_start();
        let mut values = vec![0f64; t.shape[0]];
        dtype::decode_f64(t.dtype, &bytes[start + t.begin..start + t.end], &mut values);
        if let Some(i) = values.iter().position(|v| v.is_nan()) {
            return Err(bad(format!("`{TENSOR}` contains NaN (at index {i})")));
        }
        if let Some(i) = values.iter().position(|v| v.is_infinite()) {
            return Err(bad(format!("`{TENSOR}` contains an infinite value (at index {i})")));
        }
        let d = Direction {
            values,
            dtype: t.dtype,
            metadata: header.metadata.unwrap_or_default(),
            sha256: sha256_hex(&bytes),
            path: path.to_path_buf(),
        };
        if d.norm() == 0.0 {
            return Err(bad(format!("`{TENSOR}` is the zero vector, which has no direction")));
        }
        Ok(d)
    }

    /// `||r||_2` in f64, no epsilon (method.md §6, numerical recipe step 2).
    pub fn norm(&self) -> f64 {
        self.values.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    /// `r̂ = r / ||r||` in f64.
    pub fn unit(&self) -> Vec<f64> {
        let n = self.norm();
        self.values.iter().map(|v| v / n).collect()
    }

    /// A string metadata field.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }
}

/// Writes a direction file: `values` as F32 or F64 with string metadata. Used by `find` and tests.
pub fn write(path: &Path, values: &[f64], dtype: Dtype, metadata: &Map<String, Value>) -> std::io::Result<()> {
    assert!(matches!(dtype, Dtype::F32 | Dtype::F64), "direction files hold F32 or F64");
    let mut data = Vec::new();
    dtype::encode_f64(dtype, values, &mut data);
    let entry = safetensors::TensorEntry {
        name: TENSOR.to_string(),
        dtype,
        shape: vec![values.len()],
        begin: 0,
        end: data.len(),
    };
    let mut bytes = safetensors::write_header(Some(metadata), &[entry]);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes)
}

/// Lowercase hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_raw(dir: &Path, name: &str, dtype: Dtype, values: &[f64]) -> PathBuf {
        let p = dir.join(name);
        write(&p, values, dtype, &Map::new()).unwrap();
        p
    }

    #[test]
    fn loads_and_normalises() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_raw(dir.path(), "d.safetensors", Dtype::F32, &[3.0, 0.0, 4.0]);
        let d = Direction::load(&p, 3).unwrap();
        assert_eq!(d.norm(), 5.0);
        assert_eq!(d.unit(), vec![0.6, 0.0, 0.8]);
        assert_eq!(d.sha256.len(), 64);
    }

    #[test]
    fn rejects_wrong_length_nan_inf_and_zero() {
        let dir = tempfile::tempdir().unwrap();
        let err = |values: &[f64], n: usize| {
            let p = write_raw(dir.path(), "d.safetensors", Dtype::F64, values);
            Direction::load(&p, n).unwrap_err().to_string()
        };
        let prefix = format!("direction file `{}`: ", dir.path().join("d.safetensors").display());
        assert_eq!(err(&[1.0, 2.0], 3), format!("{prefix}`direction` has length 2 but the model's hidden_size is 3"));
        assert_eq!(err(&[1.0, f64::NAN], 2), format!("{prefix}`direction` contains NaN (at index 1)"));
        assert_eq!(
            err(&[f64::INFINITY, 1.0], 2),
            format!("{prefix}`direction` contains an infinite value (at index 0)")
        );
        assert_eq!(err(&[0.0, 0.0], 2), format!("{prefix}`direction` is the zero vector, which has no direction"));
    }
}
