//! Where an edit may write, and the temporary directory it writes into.
//!
//! The output never touches the input: OUT must not be the model directory, lie inside it, or
//! contain any input file (a Hugging Face cache snapshot is a folder of symlinks into `blobs/`,
//! so every input is compared after resolving links). OUT is written as a temporary directory
//! beside it and renamed into place only when complete; a failure removes the temporary
//! directory, and `--force` replaces an existing OUT only after success.

use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// A checked output location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputTarget {
    /// OUT as the user gave it (for messages).
    pub out: PathBuf,
    /// OUT with every existing ancestor resolved (links followed).
    pub resolved: PathBuf,
    pub exists: bool,
}

impl OutputTarget {
    /// Checks OUT against the model directory and its input files (absolute or relative to the
    /// working directory, links allowed). Creates nothing.
    pub fn check(model_dir: &Path, inputs: &[PathBuf], out: &Path, force: bool) -> Result<OutputTarget> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| Error::Io { path, cause }
        };
        let model = model_dir.canonicalize().map_err(io(model_dir))?;
        let resolved = resolve(out).map_err(io(out))?;
        if resolved == model {
            return Err(Error::OutputIsModel { out: out.to_path_buf() });
        }
        if resolved.starts_with(&model) {
            return Err(Error::OutputInsideModel { out: out.to_path_buf(), model: model_dir.to_path_buf() });
        }
        if model.starts_with(&resolved) {
            return Err(Error::OutputContainsInput { out: out.to_path_buf(), input: model_dir.to_path_buf() });
        }
        for input in inputs {
            let real = input.canonicalize().map_err(io(input))?;
            if real.starts_with(&resolved) {
                return Err(Error::OutputContainsInput { out: out.to_path_buf(), input: input.clone() });
            }
        }
        let exists = std::fs::symlink_metadata(out).is_ok();
        if exists && !force {
            return Err(Error::OutputExists { out: out.to_path_buf() });
        }
        Ok(OutputTarget { out: out.to_path_buf(), resolved, exists })
    }

    fn parent(&self) -> PathBuf {
        match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn name(&self) -> OsString {
        self.resolved.file_name().map(OsString::from).unwrap_or_else(|| OsString::from("out"))
    }

    /// Creates the temporary directory beside OUT (and OUT's missing parents).
    pub fn create_temp(&self) -> Result<TempDir> {
        let parent = self.parent();
        let not_writable = |source: io::Error| {
            if is_permission(&source) {
                Error::NotWritable { dir: parent.clone(), cause: source }
            } else {
                Error::Io { path: parent.clone(), cause: source }
            }
        };
        std::fs::create_dir_all(&parent).map_err(not_writable)?;
        let mut prefix = OsString::from(".");
        prefix.push(self.name());
        prefix.push(".abliterate-tmp-");
        remove_stale(&parent, &prefix.to_string_lossy());
        let mut name = prefix.clone();
        name.push(std::process::id().to_string());
        let path = parent.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            // Left by a killed run with our pid (pids are reused): it is ours to replace.
            std::fs::remove_dir_all(&path).map_err(|source| Error::Io { path: path.clone(), cause: source })?;
        }
        std::fs::create_dir(&path).map_err(not_writable)?;
        Ok(TempDir { path: Some(path) })
    }

    /// Moves a complete temporary directory into place (replacing OUT if it exists, as --force
    /// allowed), and makes the rename durable.
    pub fn commit(&self, mut temp: TempDir) -> Result<()> {
        let parent = self.parent();
        let tmp = temp.path().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| Error::Io { path, cause }
        };
        sync_dir(&tmp).map_err(io(&tmp))?;
        if std::fs::symlink_metadata(&self.out).is_ok() {
            let mut name = OsString::from(".");
            name.push(self.name());
            name.push(format!(".abliterate-old-{}", std::process::id()));
            let old = parent.join(name);
            std::fs::rename(&self.out, &old).map_err(io(&self.out))?;
            if let Err(source) = std::fs::rename(&tmp, &self.out) {
                let _ = std::fs::rename(&old, &self.out);
                return Err(Error::Io { path: self.out.clone(), cause: source });
            }
            temp.path = None;
            let meta = std::fs::symlink_metadata(&old).map_err(io(&old))?;
            if meta.is_dir() {
                std::fs::remove_dir_all(&old).map_err(io(&old))?;
            } else {
                std::fs::remove_file(&old).map_err(io(&old))?;
            }
        } else {
            std::fs::rename(&tmp, &self.out).map_err(io(&self.out))?;
            temp.path = None;
        }
        sync_dir(&parent).map_err(io(&parent))
    }
}

/// A temporary output directory, removed on drop unless committed.
pub struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("a TempDir has a path until committed")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Removes temporary directories of this OUT left by killed runs (their process no longer exists;
/// a run that is still going keeps its own).
fn remove_stale(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem)
        || e.raw_os_error() == Some(1) // EPERM (e.g. an immutable directory)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The absolute path OUT stands for, resolving links in every ancestor that exists (OUT itself
/// and some parents may not exist yet).
fn resolve(out: &Path) -> io::Result<PathBuf> {
    let abs = if out.is_absolute() { out.to_path_buf() } else { std::env::current_dir()?.join(out) };
    let mut rest: Vec<OsString> = Vec::new();
    let mut base = abs.as_path();
    loop {
        if let Ok(real) = base.canonicalize() {
            let mut p = real;
            for c in rest.iter().rev() {
                if c == ".." {
                    p.pop();
                } else if c != "." {
                    p.push(c);
                }
            }
            return Ok(p);
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(Component::Normal(name))) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            (Some(parent), Some(Component::ParentDir)) => {
                rest.push("..".into());
                base = parent;
            }
            (Some(parent), Some(Component::CurDir)) => base = parent,
            _ => return Ok(abs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_the_model_its_inside_and_what_contains_it() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir(&model).unwrap();
        let file = model.join("config.json");
        std::fs::write(&file, "{}").unwrap();
        let inputs = vec![file];
        let e = |out: &Path, force| OutputTarget::check(&model, &inputs, out, force).unwrap_err().to_string();
        assert_eq!(
            e(&model, true),
            format!(
                "output `{}` is the model directory itself; the input is never modified, so choose another -o",
                model.display()
            )
        );
        // Through a `..` that lands back in the model, and a not-yet-existing child.
        let sneaky = model.join("sub/../");
        assert!(e(&sneaky, false).contains("is the model directory itself"));
        let inside = model.join("new/out");
        assert_eq!(
            e(&inside, false),
            format!(
                "output `{}` is inside the model directory `{}`; choose a directory outside it",
                inside.display(),
                model.display()
            )
        );
        assert!(e(tmp.path(), true).contains("contains the input"));
        // A link to the model is the model.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert!(e(&link.join("x"), false).contains("is inside the model directory"));
        let ok = OutputTarget::check(&model, &inputs, &tmp.path().join("a/b"), false).unwrap();
        assert!(!ok.exists);
    }

    #[test]
    fn a_dropped_temp_dir_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let t = OutputTarget { out: tmp.path().join("o"), resolved: tmp.path().join("o"), exists: false };
        let temp = t.create_temp().unwrap();
        let p = temp.path().to_path_buf();
        assert!(p.is_dir());
        drop(temp);
        assert!(!p.exists());
    }
}
