//! CI gates: thresholds on the measured numbers. A gate that is exceeded names itself, the measured value
//! and the threshold; the CLI exits 1 when any fails.

use serde::Serialize;

/// Thresholds; `None` is no gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Gates {
    /// On the edited model's harmful refusal rate.
    pub max_harmful_refusal: Option<f64>,
    /// On the edited model's harmless refusal rate (over-refusal).
    pub max_harmless_refusal: Option<f64>,
    /// On the mean first-token KL(original ‖ edited) over the harmless prompts.
    pub max_kl: Option<f64>,
    /// On the equivalence error: the largest relative residual difference over layers.
    pub max_equivalence_error: Option<f64>,
}

/// One gate's verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// The option's name, e.g. `--max-kl`.
    pub gate: &'static str,
    /// What it measures, in words.
    pub what: &'static str,
    pub measured: f64,
    pub threshold: f64,
    pub passed: bool,
}

impl Verdict {
    /// `--max-kl: mean first-token KL 0.612 > 0.5` (or `<=` when it passed).
    pub fn describe(&self) -> String {
        let op = if self.passed { "<=" } else { ">" };
        format!("{}: {} {} {op} {}", self.gate, self.what, fmt(self.measured), fmt(self.threshold))
    }
}

/// Short, exact enough for a threshold: 4 significant digits, scientific below 1e-3.
fn fmt(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 { format!("{v:.3e}") } else { format!("{v:.4}") }
}

/// The measured values the gates read (`None`: not measured).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    pub harmful_refusal: Option<f64>,
    pub harmless_refusal: Option<f64>,
    pub kl: Option<f64>,
    pub equivalence_error: Option<f64>,
}

impl Gates {
    pub fn any(&self) -> bool {
        self.list().iter().any(|(_, _, t, _)| t.is_some())
    }

    #[allow(clippy::type_complexity)]
    fn list(&self) -> [(&'static str, &'static str, Option<f64>, fn(&Measured) -> Option<f64>); 4] {
        [
            ("--max-harmful-refusal", "harmful refusal rate", self.max_harmful_refusal, |m| m.harmful_refusal),
            ("--max-harmless-refusal", "harmless refusal rate", self.max_harmless_refusal, |m| m.harmless_refusal),
            ("--max-kl", "mean first-token KL", self.max_kl, |m| m.kl),
            ("--max-equivalence-error", "equivalence error", self.max_equivalence_error, |m| m.equivalence_error),
        ]
    }

    /// The gates that cannot be checked because their value is not measured (e.g. `--max-equivalence-error`
    /// without an edited checkpoint): the CLI refuses these before running anything.
    pub fn unmeasurable(&self, measured: &Measured) -> Vec<&'static str> {
        self.list().into_iter().filter(|(_, _, t, get)| t.is_some() && get(measured).is_none()).map(|g| g.0).collect()
    }

    /// Every set gate's verdict, in a fixed order. A NaN measurement fails.
    pub fn check(&self, measured: &Measured) -> Vec<Verdict> {
        self.list()
            .into_iter()
            .filter_map(|(gate, what, threshold, get)| {
                let threshold = threshold?;
                let measured = get(measured)?;
                Some(Verdict { gate, what, measured, threshold, passed: measured <= threshold })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_name_the_value_and_the_threshold() {
        let gates = Gates {
            max_harmful_refusal: Some(0.1),
            max_kl: Some(0.5),
            max_equivalence_error: Some(1e-4),
            ..Default::default()
        };
        let m = Measured {
            harmful_refusal: Some(0.12),
            harmless_refusal: Some(0.5),
            kl: Some(0.5),
            equivalence_error: Some(4.36e-6),
        };
        let v = gates.check(&m);
        let lines: Vec<String> = v.iter().map(Verdict::describe).collect();
        assert_eq!(
            lines,
            [
                "--max-harmful-refusal: harmful refusal rate 0.1200 > 0.1000",
                "--max-kl: mean first-token KL 0.5000 <= 0.5000",
                "--max-equivalence-error: equivalence error 4.360e-6 <= 1.000e-4",
            ]
        );
        assert_eq!(v.iter().map(|v| v.passed).collect::<Vec<_>>(), [false, true, true]);
        let nan = Measured { kl: Some(f64::NAN), ..m };
        assert!(!gates.check(&nan)[1].passed, "NaN never passes");
        let none = Measured { equivalence_error: None, ..m };
        assert_eq!(gates.unmeasurable(&none), ["--max-equivalence-error"]);
        assert!(gates.any() && !Gates::default().any());
    }
}
