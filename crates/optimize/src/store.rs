//! The trials in OUT and the loop that adds to them.
//!
//! `OUT/settings.json` holds what the trials depend on (model, prompts, judge, generation length, space,
//! seed, sampler); `OUT/trials.jsonl` one trial per line. After every trial the whole file is written to a
//! temporary file beside it and renamed over it, so an interruption leaves the file as it was after the
//! last complete trial. Running the same command again reads both, refuses other settings, and goes on from
//! the first missing trial: the sampler's proposal for trial `t` depends only on the seed and on trials
//! `0..t` (`tpe`), so the resumed trials are those of an uninterrupted run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use crate::evaluate::Evaluator;
use crate::pareto::Score;
use crate::space::{Params, Space};
use crate::tpe::{Point, Sampler};
use crate::{Error, Result};

pub const SETTINGS: &str = "settings.json";
pub const TRIALS: &str = "trials.jsonl";

/// One completed trial.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    pub number: usize,
    /// The sampler's point (unit floats, then the choice).
    pub point: Point,
    pub params: Params,
    pub refusals: usize,
    pub refusals_second: usize,
    /// Harmful prompts judged.
    pub n_harmful: usize,
    pub kl: f64,
    /// Stopped once an earlier trial dominated it: `refusals` (and the second judge's) are lower bounds.
    pub pruned: bool,
    pub seconds: f64,
}

impl Trial {
    pub fn score(&self) -> Score {
        Score { refusals: self.refusals, kl: self.kl }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "trial": self.number,
            "point": self.point,
            "params": self.params.to_json(),
            "refusals": self.refusals,
            "refusals_second_judge": self.refusals_second,
            "harmful_prompts": self.n_harmful,
            "kl": self.kl,
            "pruned": self.pruned,
            "seconds": self.seconds,
        })
    }

    fn from_json(v: &Value, space: &Space) -> Option<Trial> {
        let point: Point = v["point"].as_array()?.iter().map(Value::as_f64).collect::<Option<_>>()?;
        if point.len() != space.dims().len() {
            return None;
        }
        Some(Trial {
            number: v["trial"].as_u64()? as usize,
            params: space.params(&point),
            point,
            refusals: v["refusals"].as_u64()? as usize,
            refusals_second: v["refusals_second_judge"].as_u64()? as usize,
            n_harmful: v["harmful_prompts"].as_u64()? as usize,
            kl: v["kl"].as_f64()?,
            pruned: v["pruned"].as_bool()?,
            seconds: v["seconds"].as_f64()?,
        })
    }
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |cause| Error::Io { path: path.to_path_buf(), cause };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Whether OUT can hold a search: absent, empty, holding only `find/` (a run stopped before its first
/// trial), or holding one (`settings.json`). Returns whether it holds one. Call before writing into OUT.
pub fn check_out(out: &Path) -> Result<bool> {
    if out.join(SETTINGS).is_file() {
        return Ok(true);
    }
    let foreign = |mut d: std::fs::ReadDir| d.any(|e| !e.is_ok_and(|e| e.file_name() == "find"));
    if std::fs::read_dir(out).is_ok_and(foreign) || out.is_file() {
        return Err(Error::Store {
            path: out.to_path_buf(),
            problem: format!("exists and holds no `{SETTINGS}` of an optimize run; choose another -o"),
        });
    }
    Ok(false)
}

/// Opens OUT for a search with `settings`: records them if OUT has none yet, or checks that the recorded
/// settings are these and reads the trials done so far.
pub fn open(out: &Path, settings: &Value, space: &Space) -> Result<Vec<Trial>> {
    let spath = out.join(SETTINGS);
    let tpath = out.join(TRIALS);
    let store_err = |path: &Path, problem: String| Error::Store { path: path.to_path_buf(), problem };
    match std::fs::read(&spath) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|cause| Error::Io { path: out.to_path_buf(), cause })?;
            let text = serde_json::to_string_pretty(settings).expect("JSON values serialize");
            write_atomic(&spath, text.as_bytes())?;
            return Ok(Vec::new());
        }
        Err(cause) => return Err(Error::Io { path: spath, cause }),
        Ok(bytes) => {
            let old: Value =
                serde_json::from_slice(&bytes).map_err(|e| store_err(&spath, format!("not valid JSON: {e}")))?;
            if let Some(key) = first_difference(&old, settings) {
                return Err(store_err(
                    &spath,
                    format!(
                        "the trials in this OUT were made with other settings (`{key}`: {} there, {} now); run with \
                         the same settings to resume, or choose another -o",
                        old.pointer(&key).unwrap_or(&Value::Null),
                        settings.pointer(&key).unwrap_or(&Value::Null)
                    ),
                ));
            }
        }
    }
    let text = match std::fs::read_to_string(&tpath) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => return Err(Error::Io { path: tpath, cause }),
        Ok(t) => t,
    };
    let mut trials = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || store_err(&tpath, format!("line {} is not a trial of this search", i + 1));
        let v: Value = serde_json::from_str(line).map_err(|_| bad())?;
        let t = Trial::from_json(&v, space).filter(|t| t.number == i).ok_or_else(bad)?;
        trials.push(t);
    }
    Ok(trials)
}

/// The JSON pointer of the first value that differs between two settings objects.
fn first_difference(a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k)));
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => {
                        if let Some(rest) = first_difference(p, q) {
                            return Some(format!("/{k}{rest}"));
                        }
                    }
                    _ => return Some(format!("/{k}")),
                }
            }
            None
        }
        _ if a == b => None,
        _ => Some(String::new()),
    }
}

/// Runs trials until OUT holds `n_trials`, calling `each` after every new one with all trials so far.
/// Returns the first `n_trials` trials (a file holding more, from a longer earlier run, keeps them).
pub fn search(
    ev: &Evaluator<'_>,
    space: &Space,
    sampler: &Sampler,
    out: &Path,
    settings: &Value,
    n_trials: usize,
    each: &mut dyn FnMut(&[Trial]),
) -> Result<Vec<Trial>> {
    let mut trials = open(out, settings, space)?;
    while trials.len() < n_trials {
        let t = Instant::now();
        let history: Vec<(Point, Vec<f64>)> =
            trials.iter().map(|t| (t.point.clone(), vec![t.refusals as f64, t.kl])).collect();
        let point = sampler.propose(&history);
        let params = space.params(&point);
        let exact: Vec<Score> = trials.iter().filter(|t| !t.pruned).map(Trial::score).collect();
        let o = ev.evaluate(&params, &exact)?;
        trials.push(Trial {
            number: trials.len(),
            point,
            params,
            refusals: o.refusals,
            refusals_second: o.refusals_second,
            n_harmful: ev.harmful_len(),
            kl: o.kl,
            pruned: o.pruned,
            seconds: t.elapsed().as_secs_f64(),
        });
        let mut text = String::new();
        for t in &trials {
            text.push_str(&t.to_json().to_string());
            text.push('\n');
        }
        write_atomic(&out.join(TRIALS), text.as_bytes())?;
        each(&trials);
    }
    trials.truncate(n_trials);
    Ok(trials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_differences_name_the_key() {
        let a = json!({"seed": 1, "space": {"layers": 4, "position": -1}});
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(
            first_difference(&a, &json!({"seed": 2, "space": {"layers": 4, "position": -1}})),
            Some("/seed".into())
        );
        assert_eq!(
            first_difference(&a, &json!({"seed": 1, "space": {"layers": 4, "position": -2}})),
            Some("/space/position".into())
        );
        assert_eq!(first_difference(&a, &json!({"seed": 1})), Some("/space".into()));
    }

    #[test]
    fn a_new_out_is_created_and_a_foreign_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(4, -1, 1, crate::space::Projection::Off).unwrap();
        let out = dir.path().join("out");
        assert_eq!(open(&out, &json!({"seed": 1}), &space).unwrap(), vec![]);
        let e = open(&out, &json!({"seed": 2}), &space).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "`{}`: the trials in this OUT were made with other settings (`/seed`: 1 there, 2 now); run with the \
                 same settings to resume, or choose another -o",
                out.join(SETTINGS).display()
            )
        );
        std::fs::write(out.join(TRIALS), "{\"trial\": 0}\n").unwrap();
        let e = open(&out, &json!({"seed": 1}), &space).unwrap_err().to_string();
        assert_eq!(e, format!("`{}`: line 1 is not a trial of this search", out.join(TRIALS).display()));
        assert!(check_out(&out).unwrap());
        let other = dir.path().join("other");
        assert!(!check_out(&other).unwrap());
        std::fs::create_dir(&other).unwrap();
        assert!(!check_out(&other).unwrap());
        std::fs::create_dir(other.join("find")).unwrap();
        assert!(!check_out(&other).unwrap());
        std::fs::write(other.join("x"), "").unwrap();
        let e = check_out(&other).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("`{}`: exists and holds no `settings.json` of an optimize run; choose another -o", other.display())
        );
    }
}
