//! The safetensors container: parsing and validating untrusted headers, and writing headers.
//!
//! Layout: 8 bytes little-endian `N`, `N` bytes of JSON, then the data section. The JSON maps
//! tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
//! data section) and may hold `"__metadata__": {string: string}`.
//!
//! Nothing here trusts the bytes: every size is computed with checked arithmetic and every
//! offset is checked against the data section before any tensor is handed out. Parsing never
//! panics, whatever the input (a fuzz target holds us to it).

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::dtype::Dtype;

/// Largest header we accept (the reference implementation's cap).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the data section, `begin..end`.
    pub begin: usize,
    pub end: usize,
}

impl TensorEntry {
    /// Number of elements (the product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A validated header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// `N`: the length of the JSON text.
    pub json_len: usize,
    /// `__metadata__`, in file order. Values are strings (checked).
    pub metadata: Option<Map<String, Value>>,
    /// Tensors in the order the JSON lists them.
    pub tensors: Vec<TensorEntry>,
}

impl Header {
    /// Where the data section starts in the file.
    pub fn data_start(&self) -> usize {
        8 + self.json_len
    }
}

/// What is wrong with a safetensors file. Messages name the problem; the caller adds the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file is {len} bytes, too short to hold the 8-byte header length")]
    TooShort { len: u64 },
    #[error("header length {header_len} is larger than the file ({len} bytes)")]
    HeaderPastEnd { header_len: u64, len: u64 },
    #[error("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    HeaderTooLarge { header_len: u64 },
    #[error("header is not valid JSON: {reason}")]
    NotJson { reason: String },
    #[error("header is not a JSON object")]
    NotObject,
    #[error("header lists tensor `{name}` twice")]
    Duplicate { name: String },
    #[error("`__metadata__` must map strings to strings ({reason})")]
    BadMetadata { reason: String },
    #[error("tensor `{name}`: {reason}")]
    BadEntry { name: String, reason: String },
    #[error("tensor `{name}`: unknown dtype `{dtype}`")]
    UnknownDtype { name: String, dtype: String },
    #[error("tensor `{name}`: shape {shape:?} of {dtype} needs {need} but data_offsets [{begin}, {end}] span {span}")]
    SizeMismatch { name: String, shape: Vec<usize>, dtype: Dtype, need: String, begin: usize, end: usize, span: usize },
    #[error("tensor `{name}`: data_offsets [{begin}, {end}] lie outside the data section ({data_len} bytes)")]
    OutOfBounds { name: String, begin: usize, end: usize, data_len: usize },
    #[error(
        "file is truncated: its header describes {need} bytes of tensor data but only {data_len} follow the header"
    )]
    Truncated { need: usize, data_len: usize },
    #[error("tensors `{a}` and `{b}` overlap in the data section")]
    Overlap { a: String, b: String },
}

/// Reads the 8-byte length prefix and checks it against the file length.
///
/// Used before mapping or reading the header so that a hostile length never causes a large read.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<usize, HeaderError> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(HeaderError::TooShort { len: file_len });
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().expect("checked: 8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { header_len: n });
    }
    if n > file_len - 8 {
        return Err(HeaderError::HeaderPastEnd { header_len: n, len: file_len });
    }
    Ok(n as usize)
}

/// Parses and validates the header of a whole safetensors file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    let n = header_len(bytes, bytes.len() as u64)?;
    let header = parse_json(&bytes[8..8 + n])?;
    validate_layout(&header, bytes.len() - 8 - n)?;
    Ok(header)
}

/// Parses the JSON text of a header and checks each entry on its own (dtype, shape, sizes).
/// [`validate_layout`] then checks the entries against the data section and each other.
pub fn parse_json(json: &[u8]) -> Result<Header, HeaderError> {
    let entries = serde_json::from_slice::<OrderedEntries>(json)
        .map_err(|e| match e.classify() {
            // Every value is accepted as `Value`, so a data error can only mean a non-object.
            serde_json::error::Category::Data => HeaderError::NotObject,
            _ => HeaderError::NotJson { reason: e.to_string() },
        })?
        .0;
    let mut seen = HashSet::with_capacity(entries.len());
    if let Some((name, _)) = entries.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(HeaderError::Duplicate { name: name.clone() });
    }
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            metadata = Some(parse_metadata(value)?);
        } else {
            tensors.push(parse_entry(name, value)?);
        }
    }
    Ok(Header { json_len: json.len(), metadata, tensors })
}

fn parse_metadata(value: Value) -> Result<Map<String, Value>, HeaderError> {
    let Value::Object(map) = value else {
        return Err(HeaderError::BadMetadata { reason: "it is not an object".into() });
    };
    if let Some((k, _)) = map.iter().find(|(_, v)| !v.is_string()) {
        return Err(HeaderError::BadMetadata { reason: format!("value of `{k}` is not a string") });
    }
    Ok(map)
}

fn parse_entry(name: String, value: Value) -> Result<TensorEntry, HeaderError> {
    let bad = |reason: &str| HeaderError::BadEntry { name: name.clone(), reason: reason.to_string() };
    let Value::Object(obj) = value else {
        return Err(bad("entry is not an object"));
    };
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets")) {
        return Err(bad(&format!("unexpected field `{k}`")));
    }
    let dtype_str = obj.get("dtype").and_then(Value::as_str).ok_or_else(|| bad("missing string field `dtype`"))?;
    let dtype = Dtype::from_safetensors(dtype_str)
        .ok_or_else(|| HeaderError::UnknownDtype { name: name.clone(), dtype: dtype_str.to_string() })?;
    let shape = as_usizes(obj.get("shape")).ok_or_else(|| bad("`shape` must be an array of non-negative integers"))?;
    let offsets = as_usizes(obj.get("data_offsets"))
        .filter(|o| o.len() == 2)
        .ok_or_else(|| bad("`data_offsets` must be two non-negative integers"))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if end < begin {
        return Err(bad(&format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    let need_bits = shape.iter().try_fold(dtype.bits(), |acc, &d| acc.checked_mul(d));
    let span = end - begin;
    let ok = match need_bits {
        Some(bits) => bits.is_multiple_of(8) && bits / 8 == span,
        None => false,
    };
    if !ok {
        let need = match need_bits {
            Some(bits) if bits.is_multiple_of(8) => format!("{} bytes", bits / 8),
            Some(bits) => format!("{bits} bits (not a whole number of bytes)"),
            None => "more than 2^64 bytes".to_string(),
        };
        return Err(HeaderError::SizeMismatch { name, shape, dtype, need, begin, end, span });
    }
    Ok(TensorEntry { name, dtype, shape, begin, end })
}

fn as_usizes(v: Option<&Value>) -> Option<Vec<usize>> {
    v?.as_array()?.iter().map(|x| x.as_u64().and_then(|u| usize::try_from(u).ok())).collect()
}

/// Checks the entries against a data section of `data_len` bytes: no two overlap, all lie inside.
///
/// Overlap is checked with one sweep over the entries sorted by start, remembering the furthest
/// end seen so far: comparing only neighbours would miss `A [0,8)`, `E [4,4)`, `C [6,10)` (the
/// empty `E` sits between the two that overlap). Empty tensors occupy no bytes and overlap
/// nothing, wherever they sit.
pub fn validate_layout(header: &Header, data_len: usize) -> Result<(), HeaderError> {
    let mut order: Vec<&TensorEntry> = header.tensors.iter().collect();
    order.sort_by_key(|t| (t.begin, t.end));
    if let Some((a, b)) = first_overlap(&order) {
        return Err(HeaderError::Overlap { a: a.name.clone(), b: b.name.clone() });
    }
    // A contiguous layout (as every writer produces) that runs past the end is a truncated file;
    // anything else past the end is a bad offset.
    let mut contiguous = true;
    let mut cursor = 0usize;
    for t in &order {
        contiguous &= t.begin == cursor;
        cursor = cursor.max(t.end);
    }
    if cursor > data_len {
        if contiguous {
            return Err(HeaderError::Truncated { need: cursor, data_len });
        }
        let t = order.iter().find(|t| t.end > data_len).expect("cursor is the max end, so one exceeds");
        return Err(HeaderError::OutOfBounds { name: t.name.clone(), begin: t.begin, end: t.end, data_len });
    }
    Ok(())
}

/// The first pair of non-empty entries whose byte ranges intersect, in `sorted` (by start): the
/// earlier one is the entry with the furthest end among those before.
fn first_overlap<'a>(sorted: &[&'a TensorEntry]) -> Option<(&'a TensorEntry, &'a TensorEntry)> {
    let mut furthest: Option<&TensorEntry> = None;
    for &t in sorted.iter().filter(|t| t.nbytes() > 0) {
        if let Some(f) = furthest {
            if t.begin < f.end {
                return Some((f, t));
            }
            if t.end <= f.end {
                continue;
            }
        }
        furthest = Some(t);
    }
    None
}

/// Serializes a header: `__metadata__` first (if any), then the tensors in the given order,
/// padded with spaces to a multiple of 8 bytes as the reference writer does. Returns the full
/// prefix (length + JSON) to write before the data section.
pub fn write_header(metadata: Option<&Map<String, Value>>, tensors: &[TensorEntry]) -> Vec<u8> {
    let mut obj = Map::new();
    if let Some(m) = metadata {
        obj.insert("__metadata__".into(), Value::Object(m.clone()));
    }
    for t in tensors {
        let mut e = Map::new();
        e.insert("dtype".into(), Value::String(t.dtype.as_str().into()));
        e.insert("shape".into(), Value::from(t.shape.clone()));
        e.insert("data_offsets".into(), Value::from(vec![t.begin, t.end]));
        obj.insert(t.name.clone(), Value::Object(e));
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("a map of strings and numbers serializes");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// A JSON object read as an ordered list of entries, keeping duplicate keys so that they can be
/// rejected (`serde_json::Map` would silently collapse them: a hostile header could hide a tensor).
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(OrderedEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + data_len, 0);
        b
    }

    #[test]
    fn parses_and_roundtrips_a_header() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}"#;
        let h = parse(&file(json, 16)).unwrap();
        assert_eq!(h.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(h.tensors[1].numel(), 1);
        let written = write_header(h.metadata.as_ref(), &h.tensors);
        assert_eq!(written.len() % 8, 0);
        let mut again = written.clone();
        again.resize(written.len() + 16, 0);
        let h2 = parse(&again).unwrap();
        assert_eq!(h2.tensors, h.tensors);
        assert_eq!(h2.metadata, h.metadata);
    }

    #[test]
    fn rejects_each_kind_of_bad_header() {
        let e = |json: &str, data: usize| parse(&file(json, data)).unwrap_err().to_string();
        assert_eq!(
            parse(&[1, 2, 3]).unwrap_err().to_string(),
            "file is 3 bytes, too short to hold the 8-byte header length"
        );
        let mut big = 1000u64.to_le_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert_eq!(parse(&big).unwrap_err().to_string(), "header length 1000 is larger than the file (10 bytes)");
        assert!(e("{not json", 0).starts_with("header is not valid JSON: "));
        assert_eq!(e("[1,2]", 0), "header is not a JSON object");
        assert_eq!(
            e(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8
            ),
            "header lists tensor `a` twice"
        );
        assert_eq!(e(r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, 4), "tensor `a`: unknown dtype `Q4`");
        assert_eq!(
            e(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4),
            "tensor `a`: shape [2] of F32 needs 8 bytes but data_offsets [0, 4] span 4"
        );
        assert_eq!(
            e(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
                8
            ),
            "tensors `a` and `b` overlap in the data section"
        );
        assert_eq!(
            e(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                6
            ),
            "file is truncated: its header describes 8 bytes of tensor data but only 6 follow the header"
        );
        assert_eq!(
            e(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[100,104]}}"#, 8),
            "tensor `a`: data_offsets [100, 104] lie outside the data section (8 bytes)"
        );
        assert_eq!(
            e(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#, 4),
            "tensor `a`: shape [4294967296, 4294967296, 4294967296] of F32 needs more than 2^64 bytes but data_offsets [0, 4] span 4"
        );
        assert_eq!(
            e(r#"{"__metadata__":{"x":1}}"#, 0),
            "`__metadata__` must map strings to strings (value of `x` is not a string)"
        );
    }

    fn entry(name: &str, begin: usize, end: usize) -> TensorEntry {
        TensorEntry { name: name.into(), dtype: Dtype::U8, shape: vec![end - begin], begin, end }
    }

    /// Issue 13: an empty tensor between two overlapping ones hid the overlap from a check that
    /// compared only neighbours.
    #[test]
    fn overlap_behind_an_empty_tensor_is_found() {
        let header = Header {
            json_len: 0,
            metadata: None,
            tensors: vec![entry("A", 0, 8), entry("E", 4, 4), entry("C", 6, 10)],
        };
        assert_eq!(
            validate_layout(&header, 10).unwrap_err().to_string(),
            "tensors `A` and `C` overlap in the data section"
        );
        // A short tensor inside a long one does not hide a later one that still overlaps the long one.
        let header = Header {
            json_len: 0,
            metadata: None,
            tensors: vec![entry("long", 0, 10), entry("short", 1, 2), entry("late", 2, 3), entry("next", 9, 12)],
        };
        assert_eq!(
            validate_layout(&header, 12).unwrap_err().to_string(),
            "tensors `long` and `short` overlap in the data section"
        );
        // Empty tensors anywhere (inside another, at its ends, past the last) overlap nothing.
        let header = Header {
            json_len: 0,
            metadata: None,
            tensors: vec![entry("A", 0, 8), entry("E1", 0, 0), entry("E2", 4, 4), entry("E3", 8, 8), entry("B", 8, 9)],
        };
        assert_eq!(validate_layout(&header, 9), Ok(()));
    }

    proptest::proptest! {
        /// The sweep agrees with checking every pair, on random layouts with empty tensors.
        #[test]
        fn overlap_check_agrees_with_every_pair(spans in proptest::collection::vec((0usize..24, 0usize..6), 0..8)) {
            let tensors: Vec<TensorEntry> =
                spans.iter().enumerate().map(|(i, &(b, n))| entry(&format!("t{i}"), b, b + n)).collect();
            let pairwise = tensors.iter().enumerate().any(|(i, x)| {
                tensors[i + 1..].iter().any(|y| x.nbytes() > 0 && y.nbytes() > 0 && x.begin < y.end && y.begin < x.end)
            });
            let header = Header { json_len: 0, metadata: None, tensors };
            let found = matches!(validate_layout(&header, 64), Err(HeaderError::Overlap { .. }));
            proptest::prop_assert_eq!(found, pairwise);
            if let Err(HeaderError::Overlap { a, b }) = validate_layout(&header, 64) {
                let get = |n: &str| header.tensors.iter().find(|t| t.name == n).unwrap();
                let (a, b) = (get(&a), get(&b));
                proptest::prop_assert!(a.begin < b.end && b.begin < a.end, "the pair named really overlaps");
            }
        }
    }
}
