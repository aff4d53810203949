//! Reads what an edit says it did (`abliterate.json`, written by `abliterate edit`) and turns it into the
//! [`Claim`] the equivalence check tests and the [`Caveat`]s under which it cannot hold exactly.
//!
//! Only reads the manifest's JSON; never trusts it blindly (every field is checked and a bad one is an error
//! naming the file) and never opens anything for writing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::equivalence::{Caveat, Claim};
use crate::measure::EditHooks;
use crate::{Error, Result};

/// The file `abliterate edit` writes into every edited model.
pub const MANIFEST: &str = "abliterate.json";

/// What an edited checkpoint's manifest says about the edit.
#[derive(Clone, Debug, PartialEq)]
pub struct EditRecord {
    pub path: PathBuf,
    pub claim: Claim,
    pub caveats: Vec<Caveat>,
    /// sha256 of the direction file the edit used.
    pub direction_sha256: String,
    /// The direction's recorded metadata (`layer`, `position`, ...), as in the file.
    pub direction_metadata: serde_json::Map<String, Value>,
    /// `tie` as recorded (`untied`, `kept_tie`, `not_tied`, `tied_unedited`).
    pub tie: String,
    /// Every edited tensor's name.
    pub edited: Vec<String>,
    /// The options the edit was made with, as recorded (`edit::manifest::options_to_json`).
    pub options: Value,
}

impl EditRecord {
    /// Reads `dir/abliterate.json`; `Ok(None)` if the model has none (not edited by abliterate).
    pub fn read(dir: &Path) -> Result<Option<EditRecord>> {
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => return Err(Error::Io { path, cause }),
        };
        let bad = |problem: String| Error::Manifest { path: path.clone(), problem };
        let m: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let str_at = |ptr: &str| {
            m.pointer(ptr)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`{ptr}` is missing or not a string")))
        };
        let direction_sha256 = str_at("/direction/sha256")?;
        let tie = str_at("/tie")?;
        let scale = m
            .pointer("/options/scale")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("`/options/scale` is missing or not a number".into()))?;
        let edited =
            m.get("edited").and_then(Value::as_array).ok_or_else(|| bad("`edited` is missing or not a list".into()))?;
        let (mut embedding, mut layers, mut names, mut gain_weighted) = (false, BTreeSet::new(), Vec::new(), 0);
        let mut dtypes = BTreeSet::new();
        let mut scales: BTreeSet<u64> = BTreeSet::new();
        for (i, e) in edited.iter().enumerate() {
            let field = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("`edited[{i}].{k}` is missing or not a string")))
            };
            let (name, kind, against, dtype) = (field("name")?, field("kind")?, field("against")?, field("dtype")?);
            match e.get("layer") {
                Some(Value::Null) | None => {
                    if kind.starts_with("embedding") {
                        embedding = true;
                    } else {
                        return Err(bad(format!("`edited[{i}]` (`{name}`, {kind}) has no layer")));
                    }
                }
                Some(v) => {
                    let l = v.as_u64().ok_or_else(|| bad(format!("`edited[{i}].layer` is not a layer index")))?;
                    layers.insert(l as usize);
                }
            }
            if against != "r" {
                gain_weighted += 1;
            }
            dtypes.insert(dtype.to_string());
            if let Some(sc) = e.get("scale").and_then(Value::as_f64) {
                scales.insert(sc.to_bits());
            }
            names.push(name.to_string());
        }
        let mut caveats = Vec::new();
        let mut variants = Vec::new();
        if m.pointer("/options/norm_preserving").and_then(Value::as_bool) == Some(true) {
            variants.push("norm-preserving edit");
        }
        if m.pointer("/options/kernel").is_some_and(|k| !k.is_null()) || scales.len() > 1 {
            variants.push("per-layer scales (layer kernel)");
        }
        // A single direction records no `layout`; a subspace or per-layer file does.
        if m.pointer("/direction/layout").is_some() {
            variants.push("several directions");
        }
        if !variants.is_empty() {
            caveats.push(Caveat::Variant { what: variants.join(", ") });
        }
        if tie == "kept_tie" {
            caveats.push(Caveat::KeptTie);
        }
        if gain_weighted > 0 {
            caveats.push(Caveat::GainWeighted { tensors: gain_weighted });
        }
        // Writers of layers outside --layers and a skipped embedding are outside the claim too; an
        // --exclude pattern can leave one writer of an edited layer (or a bias) writing r̂.
        let excluded: Vec<String> = m
            .get("excluded")
            .and_then(Value::as_array)
            .map(|xs| {
                xs.iter()
                    .filter(|x| x.get("reason").and_then(Value::as_str).is_some_and(|r| r.starts_with("--exclude")))
                    .filter_map(|x| x.get("name").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if !excluded.is_empty() {
            caveats.push(Caveat::Excluded { tensors: excluded });
        }
        for dtype in dtypes {
            if let Some(u) = unit_roundoff(&dtype) {
                caveats.push(Caveat::Rounding { dtype: dtype.to_lowercase(), unit_roundoff: u });
            }
        }
        let direction_metadata =
            m.pointer("/direction/metadata").and_then(Value::as_object).cloned().unwrap_or_default();
        Ok(Some(EditRecord {
            path,
            claim: Claim { scale, embedding, layers: layers.into_iter().collect() },
            caveats,
            direction_sha256,
            direction_metadata,
            tie,
            edited: names,
            options: m.get("options").cloned().unwrap_or(Value::Null),
        }))
    }

    /// Whether the claim's hooks (one direction, one scale) are not this edit: a layer kernel, several
    /// directions or a norm-preserving edit ([`Caveat::Variant`]).
    pub fn is_variant(&self) -> bool {
        self.caveats.iter().any(|c| matches!(c, Caveat::Variant { .. }))
    }

    /// The edit's own hooks, rebuilt: its recorded options planned again on the original checkpoint (which
    /// must plan the very tensors the manifest lists: it is the edit's source) with the direction file it
    /// was edited with, turned into hooks by [`crate::equivalence::plan_hooks`].
    pub fn hooks(&self, original: &checkpoint::Checkpoint, directions: &direction::Directions) -> Result<EditHooks> {
        let bad = |problem: String| Error::Manifest { path: self.path.clone(), problem };
        let options = edit::manifest::options_from_json(&self.options).map_err(bad)?;
        let plan =
            edit::plan(original, &options).map_err(|e| bad(format!("its options do not plan on the original: {e}")))?;
        let mut names: Vec<&str> = plan.edits.iter().map(|e| e.name.as_str()).collect();
        let mut listed: Vec<&str> = self.edited.iter().map(String::as_str).collect();
        names.sort_unstable();
        listed.sort_unstable();
        if names != listed {
            return Err(bad(format!(
                "its options plan {} tensors on the original, not the {} it lists as edited: the original is not \
                 the edit's source",
                names.len(),
                self.edited.len()
            )));
        }
        let what = format!(
            "the edit's own writes, rebuilt from its recorded options and direction file (`edit::Plan::write_ops`): \
             each edited writer's output projected with its recorded scale{}",
            if directions.single.is_none() { ", against its layer's basis" } else { "" }
        );
        EditHooks::of_plan(original, &plan, directions, what)
    }

    /// Whether the edited checkpoint should equal its hooks up to f32 rounding.
    pub fn exact(&self) -> bool {
        self.caveats.is_empty()
    }
}

/// The unit roundoff of a stored half-precision dtype (method.md §6, laws); None for f32 and f64, whose
/// rounding is below what the f32 runtime resolves anyway.
fn unit_roundoff(dtype: &str) -> Option<f64> {
    match dtype.to_ascii_uppercase().as_str() {
        "BF16" => Some(2f64.powi(-8)),
        "F16" => Some(2f64.powi(-11)),
        _ => None,
    }
}
