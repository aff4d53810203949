//! The numbers computed from one prompt's last-position logits: the refusal score of method.md §3 and
//! the first-token KL of method.md §5, with the paper's epsilons and precisions.
//!
//! Pure computation on slices; sums run in a fixed order, so results do not depend on threads.

/// method.md §3: `ε` inside both logs of the refusal score.
pub const REFUSAL_EPS: f64 = 1e-8;
/// method.md §5: `ε` inside both logs of the KL score.
pub const KL_EPS: f64 = 1e-6;

/// `softmax(z)` in f64 (`z` cast to f64 first; `exp(z - max) / Σ`).
pub fn softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let mut p: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
    p
}

/// The refusal score of one prompt (method.md §3): `log(p_ref + 1e-8) − log(p_non + 1e-8)` with
/// `p_ref = Σ_{t ∈ refusal} softmax(z)_t` in f64 and `p_non = 1 − p_ref`, rounded to f32 as the
/// reference's buffer stores it. Refusal ids must be inside the vocabulary (callers check).
pub fn refusal_score(logits: &[f32], refusal: &[u32]) -> f32 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
    let sum: f64 = logits.iter().map(|&z| (z as f64 - max).exp()).sum();
    let p_ref: f64 = refusal.iter().map(|&t| (logits[t as usize] as f64 - max).exp() / sum).sum();
    let p_non = 1.0 - p_ref;
    ((p_ref + REFUSAL_EPS).ln() - (p_non + REFUSAL_EPS).ln()) as f32
}

/// The mean of per-prompt refusal scores as the reference computes it: an f32 mean of f32 values
/// (method.md §3), returned as f64. NaN for no prompts, as `torch.tensor([]).mean()`.
pub fn mean_f32(scores: &[f32]) -> f64 {
    if scores.is_empty() {
        return f64::NAN;
    }
    // torch sums float32 with pairwise/vectorised accumulation; an f64 sum rounded once to f32 is the
    // correctly rounded sum, which those agree with to the last bit or two for a few dozen values.
    let sum: f64 = scores.iter().map(|&s| s as f64).sum();
    ((sum as f32) / scores.len() as f32) as f64
}

/// A baseline next-token distribution, prepared once for many KL scores: `P` and `log(P + 1e-6)`.
pub struct KlBase {
    p: Vec<f64>,
    log_p: Vec<f64>,
}

impl KlBase {
    pub fn new(logits: &[f32]) -> KlBase {
        let p = softmax_f64(logits);
        let log_p = p.iter().map(|&v| (v + KL_EPS).ln()).collect();
        KlBase { p, log_p }
    }

    /// `Σ_v P_v (log(P_v + 1e-6) − log(Q_v + 1e-6))` with `Q = softmax(other)` in f64 (method.md §5:
    /// KL(baseline ‖ intervened), the epsilon inside both logs).
    pub fn kl(&self, other: &[f32]) -> f64 {
        let q = softmax_f64(other);
        self.p.iter().zip(&self.log_p).zip(&q).map(|((&p, &lp), &q)| p * (lp - (q + KL_EPS).ln())).sum()
    }
}

/// First-token KL of one prompt, `KL(softmax(base) ‖ softmax(other))` with method.md §5's epsilon.
pub fn kl(base: &[f32], other: &[f32]) -> f64 {
    KlBase::new(base).kl(other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_score_is_the_clamped_logit_of_the_refusal_mass() {
        // Two equal logits out of four: p_ref = 0.5 -> score 0.
        assert_eq!(refusal_score(&[1.0, 1.0, -1e30, -1e30], &[0]), 0.0);
        // p_ref = e / (e + 3): logit = 1 - ln 3.
        let s = refusal_score(&[1.0, 0.0, 0.0, 0.0], &[0]);
        assert!((s as f64 - (1.0 - 3f64.ln())).abs() < 1e-6, "{s}");
        // Certain refusal and certain non-refusal are clamped by the epsilon to about ±18.42.
        let hi = refusal_score(&[100.0, -100.0], &[0]);
        assert!((hi as f64 - (1.0f64 + 1e-8).ln() + (1e-8f64).ln()).abs() < 1e-4, "{hi}");
        assert!((refusal_score(&[-100.0, 100.0], &[0]) + hi).abs() < 1e-4);
        // Several refusal tokens add their probabilities.
        assert_eq!(refusal_score(&[0.0, 0.0, 0.0, 0.0], &[1, 2]), 0.0);
    }

    #[test]
    fn kl_is_zero_for_equal_distributions_and_matches_the_formula() {
        let a = [0.5f32, -1.0, 2.0];
        assert_eq!(kl(&a, &a), 0.0);
        let b = [0.0f32, 0.0, 0.0];
        let p = softmax_f64(&a);
        let want: f64 = p.iter().map(|&p| p * ((p + 1e-6).ln() - (1.0 / 3.0 + 1e-6f64).ln())).sum();
        assert!((kl(&a, &b) - want).abs() < 1e-15);
        assert!(kl(&a, &b) > 0.0);
    }

    #[test]
    fn means_round_like_float32() {
        assert_eq!(mean_f32(&[1.0, 2.0]), 1.5);
        assert!(mean_f32(&[]).is_nan());
        assert_eq!(mean_f32(&[0.25, 0.5, 1.0]), (1.75f32 / 3.0) as f64);
    }
}
