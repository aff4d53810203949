//! The stable-toolchain substitute for the cargo-fuzz targets in `fuzz/` (which need nightly): a
//! fixed-seed stream of mutations of valid safetensors files, index files and config.json texts fed
//! to the parsers. None may panic, and whatever they accept must be consistent (offsets inside the
//! file, sizes matching shape x dtype, shard names that stay inside the model directory).

use std::path::{Component, Path, PathBuf};

use checkpoint::safetensors;

/// xorshift64*: a deterministic stream, so that a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn fuzz_seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/safetensors_header")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Bytes that break parsers: JSON punctuation, digits, huge numbers, dtype names, quotes.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"0",
    b"-1",
    b"18446744073709551615",
    b"1e400",
    b"null",
    b"\"F32\"",
    b"\"BF16\"",
    b"\"F4\"",
    b"\"data_offsets\"",
    b"\"shape\"",
    b"\"dtype\"",
    b"\"__metadata__\"",
    b"\\u0000",
    b"..",
    b"/",
    b"\xff\xfe",
];

/// One random edit of `b`: flip a byte, insert or delete a run, splice a token, or truncate.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>, focus: usize) {
    let span = focus.min(b.len()).max(1);
    match rng.below(6) {
        0 if !b.is_empty() => {
            let i = rng.below(span);
            b[i] ^= 1 << rng.below(8);
        }
        1 => {
            let i = rng.below(span + 1).min(b.len());
            let t = TOKENS[rng.below(TOKENS.len())];
            b.splice(i..i, t.iter().copied());
        }
        2 if !b.is_empty() => {
            let i = rng.below(span);
            let n = 1 + rng.below(8);
            b.drain(i..(i + n).min(b.len()));
        }
        3 if !b.is_empty() => {
            let i = rng.below(span);
            b[i] = rng.next() as u8;
        }
        4 => b.truncate(rng.below(b.len() + 1)),
        _ => {
            // Overwrite a run with a token, keeping the length (header lengths stay right).
            let t = TOKENS[rng.below(TOKENS.len())];
            let i = rng.below(span);
            for (k, &c) in t.iter().enumerate() {
                if let Some(x) = b.get_mut(i + k) {
                    *x = c;
                }
            }
        }
    }
}

fn check_safetensors(data: &[u8]) {
    let Ok(h) = safetensors::parse(data) else { return };
    let start = h.data_start();
    for t in &h.tensors {
        assert!(t.begin <= t.end && start + t.end <= data.len(), "accepted out-of-bounds offsets: {t:?}");
        assert_eq!(t.numel() * t.dtype.bits(), t.nbytes() * 8, "accepted a size mismatch: {t:?}");
    }
    // Pair by pair, independently of the parser's sweep (issue 13: neighbours only was not enough).
    for (i, x) in h.tensors.iter().enumerate() {
        for y in &h.tensors[i + 1..] {
            let disjoint = x.nbytes() == 0 || y.nbytes() == 0 || x.end <= y.begin || y.end <= x.begin;
            assert!(disjoint, "accepted overlapping tensors {x:?} and {y:?}");
        }
    }
}

#[test]
fn mutated_safetensors_files_never_panic_the_parser() {
    let mut seeds: Vec<Vec<u8>> = [
        "directions/llama.safetensors",
        "models/llama/bf16/model.safetensors",
        "models/qwen3_moe_fused/bf16/model.safetensors",
    ]
    .iter()
    .map(|p| std::fs::read(fixtures().join(p)).unwrap())
    .collect();
    // Small offsets and an empty tensor between two others: a digit away from an overlap that
    // only a sweep over all earlier tensors sees (the cargo-fuzz seed of the same name).
    seeds.push(std::fs::read(fuzz_seeds().join("empty_between.safetensors")).unwrap());
    let mut rng = Rng(0x5afe_7e57);
    let mut accepted = 0;
    for i in 0..20_000 {
        let seed = &seeds[i % seeds.len()];
        let header_end = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut b, header_end);
        }
        // Keep the length prefix consistent half of the time, so that the JSON itself is reached.
        if i % 2 == 0 && b.len() >= 8 {
            let grown = b.len() as i64 - seed.len() as i64;
            let n = (header_end as i64 - 8 + grown).max(0) as u64;
            let n = n.min(b.len() as u64 - 8);
            b[..8].copy_from_slice(&n.to_le_bytes());
        }
        check_safetensors(&b);
        accepted += safetensors::parse(&b).is_ok() as usize;
    }
    // The mutations must not all be rejected at the first check: some reach the layout checks.
    assert!(accepted > 100, "only {accepted} mutated files parsed; the mutations are too destructive");
}

/// Structured layouts the byte mutations rarely reach: a few tensors with small, often equal or
/// overlapping offsets, some of them empty, in any order. Whatever the parser accepts must have no
/// two non-empty tensors sharing a byte (issue 13: `A [0,8)`, `E [4,4)`, `C [6,10)` was accepted).
#[test]
fn random_layouts_with_empty_tensors_never_overlap_once_accepted() {
    let mut rng = Rng(0x0e7a_1a95);
    let (mut accepted, mut overlaps) = (0, 0);
    for _ in 0..20_000 {
        let n = 1 + rng.below(5);
        let mut entries = Vec::new();
        let mut max_end = 0;
        for i in 0..n {
            let begin = rng.below(12);
            let len = if rng.below(3) == 0 { 0 } else { 1 + rng.below(6) };
            max_end = max_end.max(begin + len);
            entries
                .push(format!(r#""t{i}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{begin},{}]}}"#, begin + len));
        }
        let json = format!("{{{}}}", entries.join(","));
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + max_end, 0);
        check_safetensors(&b);
        match safetensors::parse(&b) {
            Ok(_) => accepted += 1,
            Err(safetensors::HeaderError::Overlap { .. }) => overlaps += 1,
            Err(_) => {}
        }
    }
    assert!(accepted > 1000 && overlaps > 1000, "{accepted} accepted, {overlaps} overlapping: too few of either");
}

#[test]
fn mutated_index_files_never_panic_and_accept_only_plain_shard_names() {
    let seed = std::fs::read(fixtures().join("models/llama/f32/model.safetensors.index.json")).unwrap();
    let mut rng = Rng(0x1de7);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(3) {
            let len = b.len();
            mutate(&mut rng, &mut b, len);
        }
        let Ok((names, _)) = checkpoint::parse_index(&b) else { continue };
        accepted += 1;
        for n in &names {
            let mut c = Path::new(n).components();
            assert!(
                matches!(c.next(), Some(Component::Normal(_))) && c.next().is_none() && !n.contains(['/', '\\']),
                "accepted shard name {n:?}"
            );
        }
    }
    assert!(accepted > 100, "only {accepted} mutated index files parsed");
}

#[test]
fn mutated_config_files_never_panic() {
    let seeds: Vec<Vec<u8>> = ["llama", "gemma3", "qwen2_moe", "mixtral"]
        .iter()
        .map(|f| std::fs::read(fixtures().join(format!("models/{f}/bf16/config.json"))).unwrap())
        .collect();
    let mut rng = Rng(0xc0f1);
    for i in 0..20_000 {
        let mut b = seeds[i % seeds.len()].clone();
        for _ in 0..1 + rng.below(3) {
            let len = b.len();
            mutate(&mut rng, &mut b, len);
        }
        if let Ok(c) = checkpoint::Config::parse(&b) {
            assert!(c.hidden_size > 0 && c.num_hidden_layers > 0 && c.head_dim > 0 && c.vocab_size > 0);
        }
    }
}
