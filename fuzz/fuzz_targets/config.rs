//! `checkpoint::Config::parse` (config.json) on arbitrary bytes: `Ok` or `Err`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = checkpoint::Config::parse(data) {
        assert!(c.hidden_size > 0 && c.num_hidden_layers > 0 && c.head_dim > 0);
    }
});
