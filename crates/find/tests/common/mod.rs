//! What the find tests that edit share: `find`'s chosen direction written as a direction file and edited out
//! of the model with `edit`'s defaults, the steps `abliterate run` takes.

use model::Model;

/// The model with `direction` (un-normalized, as `find` returns it) removed by `edit` with its defaults,
/// written into a temporary directory that lives as long as the returned guard.
pub fn edited(model: &Model, direction: &[f64]) -> (tempfile::TempDir, Model) {
    let tmp = tempfile::tempdir().unwrap();
    let dfile = tmp.path().join("direction.safetensors");
    direction::write(&dfile, direction, checkpoint::Dtype::F64, &Default::default()).unwrap();
    let d = direction::Direction::load(&dfile, model.arch().hidden).unwrap();
    let ckpt = model.checkpoint();
    let plan = edit::plan(ckpt, &edit::Options::default()).unwrap();
    let dir = tmp.path().join("edited");
    edit::write(ckpt, &plan, &d, &dir, &edit::WriteOptions::default(), &edit::NoProgress).unwrap();
    let edited = Model::open(&dir).unwrap();
    (tmp, edited)
}
