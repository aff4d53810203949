//! A small multi-objective TPE sampler (MOTPE, Ozaki et al. 2020, *Multiobjective Tree-Structured Parzen
//! Estimator for Computationally Expensive Optimization Problems*), written here rather than taken from
//! crates.io: the `tpe` crate (sile/tpe 0.3) is single-objective (a scalarisation would fix one point of
//! the front in advance) and draws from `rand`'s `StdRng`, whose stream may change between releases, which
//! would break resuming a search with another build. docs/optimize.md states the rules below.
//!
//! Every parameter lives in a unit interval `[0, 1]` (a float) or is one of `n` choices. Trial `t` draws
//! from a generator seeded by `(seed, t)` alone, so the sample of trial `t` is a function of the seed and
//! of the results of trials `0..t`: a resumed search proposes exactly what an uninterrupted one would.
//! - The first `startup` trials are uniform.
//! - Then the trials are split into a good set (the first `ceil(0.1 n)`, at least 1 and at most 25, by
//!   non-dominated sorting; ties inside the last front taken by the smallest sum of objectives normalised
//!   to [0, 1] over all trials, then by trial number) and the rest.
//! - Each float gets two Parzen estimators, `l` (good) and `g` (rest): an equal-weight mixture of Gaussians
//!   truncated to [0, 1], one per observation plus a prior N(0.5, 1); each observation's bandwidth is the
//!   larger gap to its sorted neighbours (the bounds included), clipped to [1 / min(100, n + 1), 1]
//!   (hyperopt's rule). A choice gets `(count + 1) / (n + choices)` in each set.
//! - `candidates` points are drawn from `l` (each parameter independently) and the one with the largest
//!   `Σ log l(x) − log g(x)` is proposed (the first one on a tie).
//!
//! Never reads or writes a file.

/// One parameter of the search space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dim {
    /// A float in [0, 1] (callers map it to their range).
    Unit,
    /// One of `n` choices, stored as its index.
    Choice(usize),
}

/// A proposed or observed point: one value per [`Dim`] (a choice as its index, in f64).
pub type Point = Vec<f64>;

/// The sampler's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    pub dims: Vec<Dim>,
    pub seed: u64,
    /// Uniform trials before the estimators take over.
    pub startup: usize,
    /// Points drawn from `l` per proposal.
    pub candidates: usize,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fixed, and its stream never changes.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform index in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }

    /// A standard normal deviate (Box-Muller, one of the pair).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The generator of trial `trial` of a search seeded with `seed`.
pub fn trial_rng(seed: u64, trial: usize) -> Rng {
    let mut r = Rng::new(seed ^ (trial as u64).wrapping_mul(0xd134_2543_de82_ef95));
    r.next_u64();
    r
}

/// Indices of the non-dominated sorting of `objectives` (all minimised): front 0 first, each front in
/// index order. `a` dominates `b` when it is no worse in every objective and better in one.
pub fn fronts(objectives: &[Vec<f64>]) -> Vec<Vec<usize>> {
    let n = objectives.len();
    let dominates = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y);
    let mut left: Vec<usize> = (0..n).collect();
    let mut out = Vec::new();
    while !left.is_empty() {
        let front: Vec<usize> = left
            .iter()
            .copied()
            .filter(|&i| !left.iter().any(|&j| j != i && dominates(&objectives[j], &objectives[i])))
            .collect();
        left.retain(|i| !front.contains(i));
        out.push(front);
    }
    out
}

/// The good set of MOTPE (see the module docs), as a mask over the trials.
pub fn good_mask(objectives: &[Vec<f64>]) -> Vec<bool> {
    let n = objectives.len();
    let want = n.div_ceil(10).clamp(1, 25).min(n);
    let m = objectives.first().map_or(0, Vec::len);
    let (lo, hi): (Vec<f64>, Vec<f64>) = (0..m)
        .map(|k| {
            let v = objectives.iter().map(|o| o[k]);
            (v.clone().fold(f64::INFINITY, f64::min), v.fold(f64::NEG_INFINITY, f64::max))
        })
        .unzip();
    let spread = |i: usize| -> f64 {
        (0..m).map(|k| if hi[k] > lo[k] { (objectives[i][k] - lo[k]) / (hi[k] - lo[k]) } else { 0.0 }).sum()
    };
    let mut mask = vec![false; n];
    let mut taken = 0;
    for mut front in fronts(objectives) {
        if taken + front.len() > want {
            front.sort_by(|&a, &b| spread(a).total_cmp(&spread(b)).then(a.cmp(&b)));
            front.truncate(want - taken);
        }
        taken += front.len();
        front.into_iter().for_each(|i| mask[i] = true);
        if taken == want {
            break;
        }
    }
    mask
}

/// A Parzen estimator on [0, 1]: (mean, bandwidth) per component, the prior last.
struct Parzen {
    comps: Vec<(f64, f64)>,
}

/// Φ, the standard normal distribution function.
fn phi(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

impl Parzen {
    fn new(xs: &[f64]) -> Parzen {
        let mut sorted: Vec<f64> = xs.to_vec();
        sorted.sort_by(f64::total_cmp);
        let low = 1.0 / (sorted.len() as f64 + 1.0).min(100.0);
        let mut comps: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let left = if i == 0 { x } else { x - sorted[i - 1] };
                let right = if i + 1 == sorted.len() { 1.0 - x } else { sorted[i + 1] - x };
                (x, left.max(right).clamp(low, 1.0))
            })
            .collect();
        comps.push((0.5, 1.0));
        Parzen { comps }
    }

    fn log_density(&self, x: f64) -> f64 {
        let n = self.comps.len() as f64;
        let p: f64 = self
            .comps
            .iter()
            .map(|&(mu, s)| {
                let mass = phi((1.0 - mu) / s) - phi(-mu / s);
                let z = (x - mu) / s;
                (-0.5 * z * z).exp() / (s * (2.0 * std::f64::consts::PI).sqrt() * mass)
            })
            .sum::<f64>()
            / n;
        p.max(f64::MIN_POSITIVE).ln()
    }

    /// One draw: a component uniformly, then its Gaussian truncated to [0, 1] by rejection.
    fn sample(&self, rng: &mut Rng) -> f64 {
        let (mu, s) = self.comps[rng.below(self.comps.len())];
        for _ in 0..1000 {
            let x = mu + s * rng.normal();
            if (0.0..=1.0).contains(&x) {
                return x;
            }
        }
        mu.clamp(0.0, 1.0)
    }
}

impl Sampler {
    /// The point of trial `history.len()`, given the points and objectives (all minimised) of trials
    /// `0..history.len()` in order.
    pub fn propose(&self, history: &[(Point, Vec<f64>)]) -> Point {
        let mut rng = trial_rng(self.seed, history.len());
        if history.len() < self.startup.max(1) {
            return self
                .dims
                .iter()
                .map(|d| match d {
                    Dim::Unit => rng.uniform(),
                    Dim::Choice(n) => rng.below(*n) as f64,
                })
                .collect();
        }
        let objectives: Vec<Vec<f64>> = history.iter().map(|(_, o)| o.clone()).collect();
        let good = good_mask(&objectives);
        let column = |k: usize, want: bool| -> Vec<f64> {
            history.iter().zip(&good).filter(|(_, g)| **g == want).map(|((p, _), _)| p[k]).collect()
        };
        enum Est {
            Unit(Parzen, Parzen),
            Choice(Vec<f64>, Vec<f64>),
        }
        let log_freq = |xs: &[f64], n: usize| -> Vec<f64> {
            (0..n)
                .map(|c| {
                    let count = xs.iter().filter(|x| **x as usize == c).count();
                    ((count as f64 + 1.0) / (xs.len() + n) as f64).ln()
                })
                .collect()
        };
        let est: Vec<Est> = self
            .dims
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let (l, g) = (column(k, true), column(k, false));
                match d {
                    Dim::Unit => Est::Unit(Parzen::new(&l), Parzen::new(&g)),
                    Dim::Choice(n) => Est::Choice(log_freq(&l, *n), log_freq(&g, *n)),
                }
            })
            .collect();
        let mut best: Option<(f64, Point)> = None;
        for _ in 0..self.candidates.max(1) {
            let mut x = Vec::with_capacity(est.len());
            let mut score = 0.0;
            for e in &est {
                match e {
                    Est::Unit(l, g) => {
                        let v = l.sample(&mut rng);
                        score += l.log_density(v) - g.log_density(v);
                        x.push(v);
                    }
                    Est::Choice(l, g) => {
                        // Draw from l's frequencies.
                        let u = rng.uniform();
                        let mut acc = 0.0;
                        let mut c = l.len() - 1;
                        for (i, lp) in l.iter().enumerate() {
                            acc += lp.exp();
                            if u < acc {
                                c = i;
                                break;
                            }
                        }
                        score += l[c] - g[c];
                        x.push(c as f64);
                    }
                }
            }
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, x));
            }
        }
        best.expect("at least one candidate is drawn").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sphere(p: &[f64]) -> f64 {
        (p[0] - 0.3).powi(2) + (p[1] - 0.7).powi(2)
    }

    /// The best value found in `budget` trials, by TPE (`startup` < budget) or uniformly (`startup` = budget).
    fn best_of(seed: u64, budget: usize, startup: usize) -> (f64, Vec<Point>) {
        let s = Sampler { dims: vec![Dim::Unit, Dim::Unit], seed, startup, candidates: 24 };
        let mut h: Vec<(Point, Vec<f64>)> = Vec::new();
        for _ in 0..budget {
            let p = s.propose(&h);
            let v = sphere(&p);
            h.push((p, vec![v]));
        }
        (h.iter().map(|(_, o)| o[0]).fold(f64::INFINITY, f64::min), h.into_iter().map(|(p, _)| p).collect())
    }

    #[test]
    fn tpe_finds_the_minimum_of_a_2d_bowl_better_than_random_search_with_the_same_budget() {
        let (mut tpe, mut random, mut wins) = (0.0, 0.0, 0);
        // Proposals among the last 20 of each run within 0.2 of the optimum (squared distance < 0.04).
        let (mut near_tpe, mut near_random) = (0, 0);
        for seed in 0..20 {
            let (t, pts) = best_of(seed, 60, 10);
            let (r, rpts) = best_of(seed, 60, 60);
            tpe += t / 20.0;
            random += r / 20.0;
            wins += (t < r) as usize;
            // It concentrates: more of its late proposals are near the optimum than uniform search's.
            let near = pts[40..].iter().filter(|p| sphere(p) < 0.04).count();
            let rnear = rpts[40..].iter().filter(|p| sphere(p) < 0.04).count();
            assert!(
                near > rnear,
                "seed {seed}: {near} of TPE's last 20 proposals near the optimum, {rnear} of random's"
            );
            (near_tpe, near_random) = (near_tpe + near, near_random + rnear);
        }
        assert!(tpe < random / 3.0, "mean best: TPE {tpe:.2e}, random {random:.2e}");
        assert!(wins >= 16, "TPE beat random on {wins} of 20 seeds");
        assert!(near_tpe >= 3 * near_random, "late proposals near the optimum: TPE {near_tpe}, random {near_random}");
    }

    #[test]
    fn proposals_are_a_function_of_the_seed_and_the_history() {
        let s = Sampler { dims: vec![Dim::Unit, Dim::Choice(3)], seed: 7, startup: 3, candidates: 24 };
        let run = || {
            let mut h: Vec<(Point, Vec<f64>)> = Vec::new();
            for _ in 0..12 {
                let p = s.propose(&h);
                let o = vec![p[0], p[1] + (1.0 - p[0])];
                h.push((p, o));
            }
            h
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        // Trial 8 from the first 8 trials alone (a resumed search) is trial 8 of the whole one.
        assert_eq!(s.propose(&a[..8]), a[8].0);
        assert!(a.iter().all(|(p, _)| (0.0..=1.0).contains(&p[0]) && [0.0, 1.0, 2.0].contains(&p[1])));
        let other = Sampler { seed: 8, ..s.clone() };
        assert_ne!(other.propose(&[]), s.propose(&[]));
    }

    #[test]
    fn the_good_set_takes_whole_fronts_then_the_most_central_of_the_next() {
        // 20 trials -> 2 good. Front 0: trials 0 and 1; front 1: 2, 3.
        let mut o: Vec<Vec<f64>> = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![0.5, 1.2], vec![1.3, 0.4]];
        o.extend((0..16).map(|i| vec![2.0 + i as f64, 2.0]));
        let m = good_mask(&o);
        assert_eq!(m.iter().filter(|g| **g).count(), 2);
        assert!(m[0] && m[1]);
        // 30 trials -> 3 good: front 0, then trial 3 of front 1, whose normalised sum (1.3/39 + 0.4/3 = 0.167)
        // is below trial 2's (0.5/39 + 1.2/3 = 0.413).
        o.extend((0..10).map(|i| vec![30.0 + i as f64, 3.0]));
        let m = good_mask(&o);
        assert_eq!((0..4).map(|i| m[i]).collect::<Vec<_>>(), vec![true, true, false, true]);
        assert_eq!(fronts(&o[..4]), vec![vec![0, 1], vec![2, 3]]);
    }
}
