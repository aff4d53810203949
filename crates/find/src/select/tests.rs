use super::*;

fn cand(position: i64, layer: usize, kl: f64, induce: f64, bypass: f64) -> Scored {
    Scored {
        position,
        layer,
        norm: 1.0,
        degenerate: false,
        kl: Some(kl),
        induce: Some(induce),
        bypass: Some(bypass),
        rejected: None,
    }
}

fn pick(scores: &[Scored], layers: usize, opts: &SelectOptions) -> Option<(i64, usize, Rule)> {
    choose(scores, layers, opts).unwrap().map(|c| (c.position, c.layer, c.rule))
}

#[test]
fn first_pruned_layer_matches_the_table_of_method_md() {
    // method.md §5: int(L × (1.0 − 0.2)).
    let o = SelectOptions::default();
    for (l, first) in [
        (18, 14),
        (24, 19),
        (26, 20),
        (28, 22),
        (30, 24),
        (32, 25),
        (36, 28),
        (40, 32),
        (42, 33),
        (48, 38),
        (60, 48),
        (80, 64),
    ] {
        assert_eq!(o.first_pruned(l), first, "L = {l}");
    }
}

#[test]
fn the_filter_keeps_boundaries_and_the_smallest_bypass_wins_ties_by_order() {
    let o = SelectOptions::default();
    // layers: 10 -> first pruned 8.
    let scores = vec![
        cand(-2, 1, 0.1, 0.0, -3.0),       // exactly at both thresholds: kept
        cand(-2, 2, 0.05, 1.0, -3.0),      // same bypass, later: loses the tie
        cand(-2, 8, 0.01, 1.0, -9.0),      // pruned layer
        cand(-1, 1, 0.1000001, 1.0, -9.0), // KL above
        cand(-1, 2, 0.01, -1e-9, -9.0),    // induce below
    ];
    assert_eq!(pick(&scores, 10, &o), Some((-2, 1, Rule::Filter)));
    let c = choose(&scores, 10, &o).unwrap().unwrap();
    let r = c.margins.runner_up.unwrap();
    assert_eq!((r.position, r.layer, r.gap), (-2, 2, 0.0));
    assert_eq!(c.margins.closest_above_kl.unwrap().layer, 1);
    assert_eq!(c.margins.closest_below_induce.unwrap().position, -1);
    let reasons: Vec<Option<String>> = scores.iter().map(|s| rejection(s, &o, 8)).collect();
    assert_eq!(
        reasons,
        [
            None,
            None,
            Some("layer >= 8 (pruned: int(L x 0.8))".to_string()),
            Some("kl_score > 0.1".to_string()),
            Some("induce_score < 0".to_string())
        ]
    );
}

#[test]
fn nothing_passing_falls_back_to_the_smallest_kl_with_a_non_negative_induce() {
    let o = SelectOptions::default();
    let mut zero = cand(-1, 0, 0.0, 5.0, 0.5);
    zero.degenerate = true; // KL 0 would win, but a degenerate candidate is never chosen
    let scores = vec![
        zero,
        cand(-1, 1, 0.03, -4.5, 0.7), // low KL, negative induce
        cand(-1, 3, 0.15, 0.7, -4.3),
        cand(-1, 4, 0.1017, 0.73, -6.3),
        cand(-2, 4, 0.1017, 0.2, -7.0), // same KL: the smaller bypass wins the tie
        cand(-1, 9, 0.11, 1.0, -9.0),   // pruned
    ];
    let c = choose(&scores, 10, &o).unwrap().unwrap();
    assert_eq!((c.position, c.layer, c.rule.clone()), (-2, 4, Rule::MinKl { threshold: 0.1017 }));
    assert_eq!(c.margins.runner_up.as_ref().map(|r| (r.position, r.layer, r.gap)), Some((-1, 4, 0.0)));
    // Equivalent to the paper's rule with the threshold raised to the smallest KL.
    let raised = SelectOptions { kl_max: 0.1017, ..o.clone() };
    assert_eq!(pick(&scores, 10, &raised), Some((-2, 4, Rule::Filter)));
    // A tie needs the bypass scores of the tied candidates.
    let mut missing = scores.clone();
    missing[3].bypass = None;
    assert_eq!(choose(&missing, 10, &o).unwrap_err(), Missing { kl: Vec::new(), bypass: vec![3] });
    // A candidate at or above the induce threshold without its KL could pass: its KL is asked for first.
    let mut no_kl = scores.clone();
    no_kl[2].kl = None;
    assert_eq!(choose(&no_kl, 10, &o).unwrap_err(), Missing { kl: vec![2], bypass: Vec::new() });
}

#[test]
fn relaxation_is_off_by_default_and_drops_the_induce_filter_when_asked() {
    let scores = vec![cand(-1, 1, 0.05, -2.0, -1.0), cand(-1, 2, 0.02, -3.0, 0.5), cand(-1, 3, 0.5, -1.0, -5.0)];
    assert_eq!(pick(&scores, 10, &SelectOptions::default()), None);
    let relaxed = SelectOptions { relax_induce: true, ..SelectOptions::default() };
    assert_eq!(pick(&scores, 10, &relaxed), Some((-1, 1, Rule::RelaxedBypass)));
    let none_low = vec![cand(-1, 3, 0.5, -1.0, -5.0), cand(-1, 2, 0.4, -1.0, -5.0)];
    assert_eq!(pick(&none_low, 10, &relaxed), Some((-1, 2, Rule::RelaxedMinKl)));
}

/// Deterministic pseudo-random scores for many candidates, counting the evaluations.
struct Fake {
    seed: u64,
    calls: [usize; 3],
}

impl Fake {
    fn value(&self, i: usize, kind: u64) -> f64 {
        let mut x =
            self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ kind.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 29;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Evaluate for Fake {
    fn kl(&mut self, i: usize) -> Result<f64> {
        self.calls[0] += 1;
        Ok(self.value(i, 1) * 0.3)
    }
    fn induce(&mut self, i: usize) -> Result<f64> {
        self.calls[1] += 1;
        Ok(self.value(i, 2) * 4.0 - 3.0)
    }
    fn bypass(&mut self, i: usize) -> Result<f64> {
        self.calls[2] += 1;
        Ok(self.value(i, 3) * 10.0 - 8.0)
    }
}

fn blank(positions: i64, layers: usize) -> Vec<Scored> {
    let mut v = Vec::new();
    for p in -positions..0 {
        for l in 0..layers {
            let mut s = cand(p, l, 0.0, 0.0, 0.0);
            (s.kl, s.induce, s.bypass) = (None, None, None);
            s.degenerate = l == 0;
            v.push(s);
        }
    }
    v
}

// method.md §5: the shortcuts (pruned layers skipped, KL only at or above the induce threshold, bypass
// only for candidates that pass the KL and induce filters, bypass for the fallback's ties and choice only) give the exhaustive choice and the
// exhaustive value of every score they compute.
#[test]
fn shortcuts_choose_like_the_exhaustive_selection() {
    let (mut saved, mut saved_kl) = (0, 0);
    for seed in 0..300u64 {
        for relax in [false, true] {
            let layers = 12;
            let opts = SelectOptions { relax_induce: relax, ..SelectOptions::default() };
            let mut full = blank(4, layers);
            let mut f = Fake { seed, calls: [0; 3] };
            let all = SelectOptions { all_scores: true, ..opts.clone() };
            let want = select(&mut full, layers, &all, &mut f).map(|c| (c.position, c.layer, c.rule));
            let mut short = blank(4, layers);
            let mut g = Fake { seed, calls: [0; 3] };
            let got = select(&mut short, layers, &opts, &mut g).map(|c| (c.position, c.layer, c.rule));
            match (&want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "seed {seed}"),
                (Err(w), Err(g)) => assert_eq!(w.to_string(), g.to_string()),
                _ => panic!("seed {seed}: {want:?} vs {got:?}"),
            }
            for (a, b) in full.iter().zip(&short) {
                for (x, y) in [(a.kl, b.kl), (a.induce, b.induce), (a.bypass, b.bypass)] {
                    if let Some(y) = y {
                        assert_eq!(x, Some(y));
                    }
                }
            }
            assert!(g.calls[0] <= 4 * 9 && g.calls[2] <= f.calls[2]);
            saved += f.calls[2] - g.calls[2];
            saved_kl += f.calls[0] - g.calls[0];
        }
    }
    assert!(saved > 0 && saved_kl > 0, "the shortcut skipped bypass ({saved}) and KL ({saved_kl}) evaluations");
}

#[test]
fn no_candidate_is_an_error_naming_the_best() {
    let mut scores = blank(1, 3);
    struct Neg;
    impl Evaluate for Neg {
        fn kl(&mut self, i: usize) -> Result<f64> {
            Ok(0.01 * i as f64)
        }
        fn induce(&mut self, i: usize) -> Result<f64> {
            Ok(if i == 1 { -0.5 } else { -1.0 })
        }
        fn bypass(&mut self, _: usize) -> Result<f64> {
            Ok(0.0)
        }
    }
    let e =
        select(&mut scores, 3, &SelectOptions { max_layer_fraction: 1.0, ..Default::default() }, &mut Neg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no candidate can be chosen: none passes the filter (KL <= 0.1, induce >= 0, layer < 3) and none with an \
         allowed layer has induce >= 0; the highest induce scores: (-1, 1) induce -0.500; (-1, 2) induce -1.000. \
         Activation addition of these candidates does not make the model refuse harmless prompts: try other or more \
         prompts, check the refusal token, or pass --relax-induce (smallest bypass among candidates with KL <= 0.1; \
         it scores every candidate's KL)"
    );
    // Below the induce threshold, no KL was computed.
    assert!(scores.iter().all(|s| s.kl.is_none()));
}
