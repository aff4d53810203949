//! Test helpers shared by every crate's tests: where the workspace, its fixtures and the shared
//! material are, and the real test model (SmolLM2-135M-Instruct), built once and cached.
//!
//! The real model comes from `../shared/models/build-smollm2.sh`. In a user's fresh clone there is
//! no `../shared`; tests that need it then say so plainly on stderr and skip.
//!
//! [`synth`] writes small synthetic checkpoints and direction files for tests.

pub mod synth;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the folder with the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root exists")
}

/// `fixtures/` of the workspace.
pub fn fixtures() -> PathBuf {
    workspace_root().join("fixtures")
}

/// The shared material folder (`../shared` beside the checkout), if present.
pub fn shared() -> Option<PathBuf> {
    let p = workspace_root().join("../shared");
    p.join("models/build-smollm2.sh").is_file().then(|| p.canonicalize().expect("exists"))
}

/// The real test model directory, built on first use and cached under `target/test-models/`.
/// Returns None (after saying why on stderr) where `../shared` is absent.
pub fn smollm2() -> Option<PathBuf> {
    static MODEL: OnceLock<Option<PathBuf>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Some(shared) = shared() else {
                eprintln!("skipping: ../shared is absent (a fresh clone), so the real test model cannot be built");
                return None;
            };
            let out = workspace_root().join("target/test-models/smollm2-135m-instruct");
            let status =
                Command::new("bash").arg(shared.join("models/build-smollm2.sh")).arg(&out).status().expect("bash runs");
            assert!(status.success(), "build-smollm2.sh failed ({status}); see its output above");
            Some(out)
        })
        .clone()
}

/// The real direction of the shared model (`../shared/directions/smollm2-base-l15.safetensors`).
pub fn smollm2_direction() -> Option<PathBuf> {
    shared().map(|s| s.join("directions/smollm2-base-l15.safetensors"))
}
