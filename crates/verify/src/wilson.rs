//! Wilson score intervals for a proportion (Wilson 1927): the interval a refusal rate is reported with.
//!
//! Chosen over the normal ("Wald") interval because refusal rates sit near 0 and 1, where Wald collapses to a
//! point (0/100 gives [0, 0]) while Wilson still says how far the true rate could be from what was measured.

use serde::Serialize;

/// The two-sided 95% normal quantile, `Φ⁻¹(0.975)`.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A proportion `k / n` with its two-sided Wilson score interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rate {
    pub k: usize,
    pub n: usize,
    /// `k / n` (0 when `n` is 0).
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

impl Rate {
    /// `k` successes out of `n` with the 95% Wilson interval. With `n = 0` nothing is known: the interval
    /// is [0, 1].
    pub fn new(k: usize, n: usize) -> Rate {
        let (low, high) = wilson(k, n, Z95);
        Rate { k, n, rate: if n == 0 { 0.0 } else { k as f64 / n as f64 }, low, high }
    }

    /// Counts the `true` values.
    pub fn of(flags: impl IntoIterator<Item = bool>) -> Rate {
        let (mut k, mut n) = (0, 0);
        for f in flags {
            k += f as usize;
            n += 1;
        }
        Rate::new(k, n)
    }
}

/// The Wilson score interval of `k / n` for the normal quantile `z`:
/// `(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)`, clamped to [0, 1] against rounding.
pub fn wilson(k: usize, n: usize, z: f64) -> (f64, f64) {
    assert!(k <= n, "wilson: {k} successes out of {n} trials is impossible");
    if n == 0 {
        return (0.0, 1.0);
    }
    let n_f = n as f64;
    let p = k as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let center = (p + z2 / (2.0 * n_f)) / denom;
    let half = z / denom * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    // At k = 0 (k = n) the lower (upper) end is exactly 0 (1) in exact arithmetic.
    let low = if k == 0 { 0.0 } else { (center - half).max(0.0) };
    let high = if k == n { 1.0 } else { (center + half).min(1.0) };
    (low, high)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `statsmodels.stats.proportion.proportion_confint(k, n, alpha=0.05, method="wilson")`, statsmodels
    /// 0.15.0 (an independent implementation): `(k, n, low, high)`.
    const STATSMODELS: [(usize, usize, f64, f64); 11] = [
        (0, 100, 0.0, 0.03699349820698569),
        (86, 100, 0.7786281178903616, 0.9147365634006086),
        (100, 100, 0.9630065017930143, 1.0),
        (2, 100, 0.00550196755016235, 0.07001179072854391),
        (97, 100, 0.9154806357094724, 0.9897454759759611),
        (1, 1, 0.2065493143772374, 1.0),
        (0, 1, 0.0, 0.7934506856227627),
        (5, 14, 0.16344731753554134, 0.612355768960926),
        (37, 39, 0.8311435995238637, 0.9858220445847258),
        (50, 100, 0.4038315303659956, 0.5961684696340044),
        (3, 7, 0.15821985525146964, 0.7495416354723428),
    ];

    #[test]
    fn wilson_matches_statsmodels() {
        for (k, n, low, high) in STATSMODELS {
            let r = Rate::new(k, n);
            assert!((r.low - low).abs() < 1e-14 && (r.high - high).abs() < 1e-14, "{k}/{n}: {r:?} vs [{low}, {high}]");
            assert_eq!(r.rate, k as f64 / n as f64);
        }
    }

    #[test]
    fn interval_contains_the_rate_and_narrows_with_n() {
        for n in 1..200 {
            for k in 0..=n {
                let r = Rate::new(k, n);
                assert!(0.0 <= r.low && r.low <= r.rate && r.rate <= r.high && r.high <= 1.0, "{r:?}");
            }
        }
        let width = |k, n| {
            let r = Rate::new(k, n);
            r.high - r.low
        };
        assert!(width(10, 100) > width(100, 1000));
        assert_eq!(Rate::new(0, 0), Rate { k: 0, n: 0, rate: 0.0, low: 0.0, high: 1.0 });
        assert_eq!(Rate::of([true, false, true, true]), Rate::new(3, 4));
    }
}
