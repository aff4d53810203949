//! What `find` and `verify` share (placeholder until the crate lands; the embedded prompt sets are in
//! `prompts/`).
