//! The Pareto front of (harmful refusals, KL) and the rule that picks one trial from it. Both minimised.

/// The objectives of one trial.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub refusals: usize,
    pub kl: f64,
}

/// Whether `a` dominates `b`: no worse in both objectives and better in one.
pub fn dominates(a: Score, b: Score) -> bool {
    a.refusals <= b.refusals && a.kl <= b.kl && (a.refusals < b.refusals || a.kl < b.kl)
}

/// Indices of the non-dominated scores, sorted by refusals then KL then index (O(n log n): a sweep in
/// refusal order keeping the smallest KL of the fewer-refusal groups). Equal scores are all kept (neither
/// dominates the other).
pub fn front(scores: &[Score]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        x.refusals.cmp(&y.refusals).then(x.kl.total_cmp(&y.kl)).then(a.cmp(&b))
    });
    let mut out = Vec::new();
    // The smallest KL among trials with strictly fewer refusals than the current group.
    let mut best_fewer = f64::INFINITY;
    let mut i = 0;
    while i < order.len() {
        let r = scores[order[i]].refusals;
        let group_min = scores[order[i]].kl;
        let mut j = i;
        while j < order.len() && scores[order[j]].refusals == r {
            let s = scores[order[j]];
            if s.kl == group_min && group_min < best_fewer {
                out.push(order[j]);
            }
            j += 1;
        }
        best_fewer = best_fewer.min(group_min);
        i = j;
    }
    out
}

/// The smallest refusal count at which a trial of first-token KL `kl` is dominated by one of `prior`
/// (exact scores): `min(A + 1, B)` with `A` the fewest refusals among them with KL <= `kl` and `B` among
/// those with KL < `kl`. `None` when none has KL <= `kl` (no count makes it dominated). A trial that
/// reaches the count can be neither on the front nor chosen ([`choose`] prefers the dominating one), so a
/// search may stop counting there (`optimize`'s pruning).
pub fn dominated_at(prior: &[Score], kl: f64) -> Option<usize> {
    let a = prior.iter().filter(|s| s.kl <= kl).map(|s| s.refusals).min()?;
    let b = prior.iter().filter(|s| s.kl < kl).map(|s| s.refusals).min();
    Some(b.map_or(a + 1, |b| b.min(a + 1)))
}

/// The default choice rule: among the trials with KL <= `max_kl`, the fewest refusals, then the smallest
/// KL, then the earliest trial. `None` when no trial is under the bound.
pub fn choose(scores: &[Score], max_kl: f64) -> Option<usize> {
    (0..scores.len()).filter(|&i| scores[i].kl <= max_kl).min_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        x.refusals.cmp(&y.refusals).then(x.kl.total_cmp(&y.kl)).then(a.cmp(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute_force(scores: &[Score]) -> Vec<usize> {
        (0..scores.len()).filter(|&i| !scores.iter().any(|&q| dominates(q, scores[i]))).collect()
    }

    proptest! {
        #[test]
        fn the_front_is_exactly_the_set_no_trial_dominates(
            raw in prop::collection::vec((0usize..6, 0u8..8), 0..40)
        ) {
            // Few distinct values, so ties in either objective and equal points are frequent.
            let scores: Vec<Score> = raw.iter().map(|&(r, k)| Score { refusals: r, kl: k as f64 / 8.0 }).collect();
            let mut got = front(&scores);
            got.sort();
            prop_assert_eq!(got, brute_force(&scores));
        }

        #[test]
        fn a_count_is_dominated_exactly_from_the_pruning_bound_on(
            raw in prop::collection::vec((0usize..6, 0u8..8), 0..20), k in 0u8..8
        ) {
            let prior: Vec<Score> = raw.iter().map(|&(r, k)| Score { refusals: r, kl: k as f64 / 8.0 }).collect();
            let kl = k as f64 / 8.0;
            let at = dominated_at(&prior, kl);
            for c in 0..8 {
                let dominated = prior.iter().any(|&q| dominates(q, Score { refusals: c, kl }));
                prop_assert_eq!(dominated, at.is_some_and(|n| c >= n), "count {}", c);
            }
        }

        #[test]
        fn the_choice_is_on_the_front_and_under_the_bound(
            raw in prop::collection::vec((0usize..6, 0u8..8), 1..40), bound in 0u8..8
        ) {
            let scores: Vec<Score> = raw.iter().map(|&(r, k)| Score { refusals: r, kl: k as f64 / 8.0 }).collect();
            let max_kl = bound as f64 / 8.0;
            match choose(&scores, max_kl) {
                Some(c) => {
                    prop_assert!(scores[c].kl <= max_kl);
                    prop_assert!(front(&scores).contains(&c));
                    for s in scores.iter().filter(|s| s.kl <= max_kl) {
                        prop_assert!(s.refusals >= scores[c].refusals);
                    }
                }
                None => prop_assert!(scores.iter().all(|s| s.kl > max_kl)),
            }
        }
    }

    #[test]
    fn the_choice_rule_prefers_fewer_refusals_under_the_bound_then_smaller_kl() {
        let s = |refusals, kl| Score { refusals, kl };
        let scores = [s(0, 0.5), s(2, 0.05), s(1, 0.09), s(1, 0.08), s(1, 0.08), s(3, 0.01)];
        // Trial 0 refuses least but is over the bound; 3 and 4 tie, the earlier wins.
        assert_eq!(choose(&scores, 0.1), Some(3));
        assert_eq!(choose(&scores, 0.5), Some(0));
        assert_eq!(choose(&scores, 0.06), Some(1));
        assert_eq!(choose(&scores, 0.001), None);
        assert_eq!(front(&scores), vec![0, 3, 4, 1, 5]);
    }
}
