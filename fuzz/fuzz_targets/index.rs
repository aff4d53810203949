//! `checkpoint::parse_index` (the text of `model.safetensors.index.json`) on arbitrary bytes: it
//! must return `Ok` or `Err`, never panic; and every shard name it accepts is a plain file name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((names, _)) = checkpoint::parse_index(data) else { return };
    assert!(!names.is_empty());
    for n in &names {
        assert!(!n.is_empty() && !n.contains('/') && !n.contains('\\') && n != "." && n != "..", "{n:?}");
        let mut comps = std::path::Path::new(n).components();
        assert!(matches!(comps.next(), Some(std::path::Component::Normal(_))) && comps.next().is_none(), "{n:?}");
    }
});
