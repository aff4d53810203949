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
}

#[test]
fn mutated_safetensors_files_never_panic_the_parser() {
    let seeds: Vec<Vec<u8>> = [
        "directions/llama.safetensors",
        "models/llama/bf16/model.safetensors",
        "models/qwen3_moe_fused/bf16/model.safetensors",
    ]
    .iter()
    .map(|p| std::fs::read(fixtures().join(p)).unwrap())
    .collect();
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
