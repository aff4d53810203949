//! Deriving directions from directions, means and activations (docs/variants.md, "Direction variants"):
//! the math of `abliterate direction`, on given inputs. `find` supplies the inputs (harmless means per layer
//! and position, in the layout of a candidates file; per-prompt activations at one site) and the files here
//! are what `edit` and the hooks read.
//!
//! Everything is f64, sequential and in a stated order, so results do not depend on threads. Never writes
//! (the CLI writes the results with the crate's writers).

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{self, ComputeSvdVectors};
use faer::{MatRef, Par};

use crate::set::Basis;
use crate::{Candidates, norm};

/// `r − V Vᵀ r` with `V` the MGS2 basis ([`Basis::orthonormalize`]) of `protect`: what is left of `r` once
/// its components along every protected direction are gone. With one protected vector, the harmless mean
/// `μ`, this is "projected abliteration": `r − (r·μ̂) μ̂`. The result is not renormalized (edits normalize).
pub fn orthogonalize(r: &[f64], protect: &[&[f64]]) -> Result<Vec<f64>, String> {
    if protect.iter().any(|p| p.len() != r.len()) {
        return Err(format!("a protected direction's length differs from the direction's ({})", r.len()));
    }
    let basis = Basis::orthonormalize(protect).map_err(|e| format!("the protected directions: {e}"))?;
    let out = basis.project_out(r);
    let (n, n0) = (norm(&out), norm(r));
    if n <= crate::set::DEPENDENT * n0 {
        return Err(format!(
            "the direction lies in the span of the protected directions (what is left has {:.1e} of its norm)",
            n / n0
        ));
    }
    Ok(out)
}

/// The orthonormal basis of the top-`k` right singular vectors of the per-prompt differences
/// `D[i] = harmful[i] − harmless[i]` (`n` pairs, in order; the sets must have the same size), optionally
/// centred first (`D[i] − mean(D)`, abliterix's choice; uncentred, the first vector is close to the mean
/// difference). Thin SVD of `D` (`n x d`) by faer in f64, sequentially. Signs: each vector is turned to
/// have a non-negative dot product with the mean difference (ties: its largest-magnitude entry positive),
/// so the result is deterministic. Returns the basis and every singular value.
pub fn top_k_svd(
    harmful: &[f64],
    harmless: &[f64],
    d: usize,
    k: usize,
    center: bool,
) -> Result<(Basis, Vec<f64>), String> {
    if harmful.len() != harmless.len() || harmful.is_empty() || !harmful.len().is_multiple_of(d) {
        return Err(format!(
            "the harmful and harmless activations must be the same number of rows of length {d} ({} and {} values)",
            harmful.len(),
            harmless.len()
        ));
    }
    let n = harmful.len() / d;
    if k == 0 || k > n.min(d) {
        return Err(format!("k = {k}: needs 1 <= k <= min(pairs {n}, hidden {d})"));
    }
    let mut diff: Vec<f64> = harmful.iter().zip(harmless).map(|(a, b)| a - b).collect();
    let mut mean = vec![0f64; d];
    for row in diff.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    if center {
        for row in diff.chunks_exact_mut(d) {
            row.iter_mut().zip(&mean).for_each(|(x, m)| *x -= m);
        }
    }
    // D is n x d row-major = d x n column-major; the right singular vectors of D are the left ones of Dᵀ.
    let a = MatRef::from_column_major_slice(&diff, d, n);
    let size = d.min(n);
    let mut s = Diag::<f64>::zeros(size);
    let mut u = faer::Mat::<f64>::zeros(d, size);
    let par = Par::Seq;
    let scratch =
        svd::svd_scratch::<f64>(d, n, ComputeSvdVectors::Thin, ComputeSvdVectors::No, par, Default::default());
    let mut mem = MemBuffer::new(scratch);
    svd::svd(a, s.as_mut(), Some(u.as_mut()), None, par, MemStack::new(&mut mem), Default::default())
        .map_err(|e| format!("the singular value decomposition did not converge ({e:?})"))?;
    let sv: Vec<f64> = s.column_vector().iter().copied().collect();
    let mut vectors = Vec::with_capacity(k * d);
    for m in 0..k {
        let mut v: Vec<f64> = (0..d).map(|i| u[(i, m)]).collect();
        let dot: f64 = v.iter().zip(&mean).map(|(a, b)| a * b).sum();
        let flip = if dot != 0.0 {
            dot < 0.0
        } else {
            let big = v.iter().copied().fold(0f64, |b, x| if x.abs() > b.abs() { x } else { b });
            big < 0.0
        };
        if flip {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        vectors.extend(v);
    }
    let rows: Vec<&[f64]> = vectors.chunks_exact(d).collect();
    let basis = Basis::orthonormalize(&rows).map_err(|e| format!("the singular vectors: {e}"))?;
    Ok((basis, sv))
}

/// Which residual a decoder block's writers take their vector from in a per-layer file made from
/// per-residual vectors (`n` of them, residual `i` entering layer `i`): block `l` writes into the residual
/// entering `l + 1`, so it takes vector `l + 1`; the last block, whose output a candidates file does not hold,
/// takes the last vector (`n − 1`). The embedding takes block 0's. docs/variants.md states this rule.
pub fn source_residual(block: usize, n: usize) -> usize {
    (block + 1).min(n - 1)
}

/// Per-layer directions from candidates at one position: block `l` ← candidate `source_residual(l)`.
/// Returns `[layers, d]` row-major and the residual each row came from. Zero candidates are refused.
pub fn per_layer(c: &Candidates, position: i64) -> Result<(Vec<f64>, Vec<usize>), String> {
    let n = c.layers();
    let mut rows = Vec::with_capacity(n * c.hidden());
    let mut sources = Vec::with_capacity(n);
    for block in 0..n {
        let src = source_residual(block, n);
        let cand = crate::Candidate { position, layer: src };
        let d = c.direction(cand).map_err(|e| format!("block {block} (candidate {cand}): {e}"))?;
        rows.extend(d.values);
        sources.push(src);
    }
    Ok((rows, sources))
}

/// heretic's fractional direction index: `normalize((1 − t) r̂_a + t r̂_b)` with `a = ⌊index⌋`,
/// `b = a + 1`, `t = index − a`, `r̂` the normalized candidates at `position` (residual `a` entering
/// layer `a`). An integer index gives `r̂_a` itself.
pub fn interpolate(c: &Candidates, position: i64, index: f64) -> Result<Vec<f64>, String> {
    let last = c.layers() - 1;
    if !index.is_finite() || index < 0.0 || index > last as f64 {
        return Err(format!("index {index} is outside 0..={last} (the candidates' layers)"));
    }
    let a = index.floor() as usize;
    let t = index - a as f64;
    let unit = |layer: usize| -> Result<Vec<f64>, String> {
        let cand = crate::Candidate { position, layer };
        Ok(c.direction(cand).map_err(|e| format!("candidate {cand}: {e}"))?.unit())
    };
    let ra = unit(a)?;
    if t == 0.0 {
        return Ok(ra);
    }
    let rb = unit(a + 1)?;
    let mix: Vec<f64> = ra.iter().zip(&rb).map(|(x, y)| (1.0 - t) * x + t * y).collect();
    let n = norm(&mix);
    if !n.is_normal() {
        return Err(format!("the candidates at layers {a} and {} cancel at index {index}", a + 1));
    }
    Ok(mix.iter().map(|x| x / n).collect())
}

/// Biprojection: one direction `r`, orthogonalized for each block `l` against the harmless mean of the
/// residual it writes into (`means` at `position`, residual `source_residual(l)`). Returns `[layers, d]`.
pub fn biproject(r: &[f64], means: &Candidates, position: i64) -> Result<(Vec<f64>, Vec<usize>), String> {
    let n = means.layers();
    let mut rows = Vec::with_capacity(n * r.len());
    let mut sources = Vec::with_capacity(n);
    for block in 0..n {
        let src = source_residual(block, n);
        let mu = means
            .get(crate::Candidate { position, layer: src })
            .map_err(|e| format!("harmless mean of residual {src}: {e}"))?;
        rows.extend(orthogonalize(r, &[mu]).map_err(|e| format!("block {block}: {e}"))?);
        sources.push(src);
    }
    Ok((rows, sources))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projected_removes_the_harmless_component_only() {
        let r = [3.0, 4.0, 1.0];
        let mu = [0.0, 2.0, 0.0];
        assert_eq!(orthogonalize(&r, &[&mu]).unwrap(), vec![3.0, 0.0, 1.0]);
        let e = orthogonalize(&[0.0, 1.0, 0.0], &[&mu]).unwrap_err();
        assert!(e.starts_with("the direction lies in the span of the protected directions"), "{e}");
        // Two protected directions: both components go.
        assert_eq!(orthogonalize(&r, &[&mu, &[1.0, 1.0, 0.0]]).unwrap(), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn svd_of_rank_two_differences_recovers_their_plane() {
        // d = 4; differences lie in span(e0, e1) with e0 dominant; harmless = 0.
        let d = 4;
        let rows: Vec<[f64; 4]> =
            vec![[5.0, 1.0, 0.0, 0.0], [4.0, -1.0, 0.0, 0.0], [6.0, 0.5, 0.0, 0.0], [5.0, -0.5, 0.0, 0.0]];
        let harmful: Vec<f64> = rows.iter().flatten().copied().collect();
        let harmless = vec![0f64; harmful.len()];
        let (b, sv) = top_k_svd(&harmful, &harmless, d, 2, false).unwrap();
        assert_eq!(b.k(), 2);
        for v in b.vectors() {
            assert!(v[2].abs() < 1e-12 && v[3].abs() < 1e-12, "{v:?}");
        }
        // The first is oriented along the mean difference (positive e0), and sv[2..] vanish.
        assert!(b.vector(0)[0] > 0.99, "{:?}", b.vector(0));
        assert!(sv[2] < 1e-12 && sv[1] > 0.1, "{sv:?}");
        // Centred: the mean (e0 mostly) is removed and the top vector is the spread along e1 mostly.
        let (b, _) = top_k_svd(&harmful, &harmless, d, 1, true).unwrap();
        assert!(b.vector(0)[1].abs() > 0.7, "{:?}", b.vector(0));
        let e = top_k_svd(&harmful, &harmless[..8], d, 1, false).unwrap_err();
        assert!(e.starts_with("the harmful and harmless activations must be the same number"), "{e}");
    }

    #[test]
    fn blocks_take_the_residual_they_write_into() {
        assert_eq!((0..4).map(|l| source_residual(l, 4)).collect::<Vec<_>>(), vec![1, 2, 3, 3]);
    }
}
