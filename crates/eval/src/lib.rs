//! Placeholder for the evaluation crate shared by `find` and `verify` (prompt sets, refusal score, KL).
//! It exists only so that the workspace (`members = ["crates/*"]`) builds while `crates/eval` holds just
//! the embedded prompt sets in `prompts/`; the crate's real code replaces this file.
