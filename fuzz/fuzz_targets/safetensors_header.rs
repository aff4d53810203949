//! `checkpoint::safetensors::parse` on arbitrary bytes: it must return `Ok` or `Err`, never panic,
//! overflow or read out of bounds; and what it accepts must be consistent.
#![no_main]

use checkpoint::safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = safetensors::parse(data) else { return };
    // Everything accepted lies inside the file, and slicing it cannot panic.
    let start = header.data_start();
    for t in &header.tensors {
        assert!(t.begin <= t.end && start + t.end <= data.len(), "accepted offsets must be in bounds");
        let _ = &data[start + t.begin..start + t.end];
        assert_eq!(t.numel() * t.dtype.bits(), t.nbytes() * 8, "accepted sizes must match shape x dtype");
    }
    // No two non-empty tensors share a byte (checked pair by pair, independently of the sweep).
    for (i, x) in header.tensors.iter().enumerate() {
        for y in &header.tensors[i + 1..] {
            let disjoint = x.nbytes() == 0 || y.nbytes() == 0 || x.end <= y.begin || y.end <= x.begin;
            assert!(disjoint, "accepted overlapping tensors `{}` and `{}`", x.name, y.name);
        }
    }
    // What we write for an accepted header parses back to the same entries.
    let mut again = safetensors::write_header(header.metadata.as_ref(), &header.tensors);
    again.extend_from_slice(&data[start..]);
    let back = safetensors::parse(&again).expect("a header we wrote must parse");
    assert_eq!(back.tensors, header.tensors);
    assert_eq!(back.metadata, header.metadata);
});
