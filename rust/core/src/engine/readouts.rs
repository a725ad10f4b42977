//! The readouts of a packed pass: Yes/No log-odds ([`Engine::yes_no`]), per-token log-probabilities
//! ([`Engine::token_logprobs`]), those with the per-token KL from the unsteered model ([`Engine::token_stats`]),
//! and decoder-block outputs ([`Engine::hidden`]); logits are made a chunk of rows at a time, in f64 sums.

use rayon::prelude::*;

use super::packing::read_range;
use super::{Engine, EngineError, Result, Steer};

impl Engine {
    /// Yes/No log-odds at each sequence's last position, for every branch.
    ///
    /// score = logsumexp(log p[pos]) − logsumexp(log p[neg]) (nats); mass = p(pos) + p(neg).
    /// Returns (scores, mass), each (branches, n) row-major. `batch`: sequences per packed pass.
    pub fn yes_no(
        &self,
        seqs: &[Vec<u32>],
        branches: &[Steer],
        pos: &[u32],
        neg: &[u32],
        batch: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let (n, nbr, v) = (seqs.len(), branches.len(), self.model.cfg.vocab);
        if pos.is_empty() || neg.is_empty() {
            return Err(EngineError::Input("answer token sets must be non-empty".into()));
        }
        if let Some(bad) = pos.iter().chain(neg).find(|&&t| t as usize >= v) {
            return Err(EngineError::Input(format!("answer token id {bad} out of range for vocabulary size {v}")));
        }
        let mut scores = vec![0f64; nbr * n];
        let mut mass = vec![0f64; nbr * n];
        let side = self.side_factors(branches)?;
        for idx in Self::batches(seqs, batch) {
            let sub: Vec<&[u32]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
            let read: Vec<(usize, usize)> = sub.iter().map(|s| (s.len().saturating_sub(1), s.len())).collect();
            let out = self.run(&sub, &read, branches, &side, &[], true)?;
            let rows = nbr * idx.len();
            let lp = self.row_logsumexp(&out.finals, rows, &[pos, neg])?;
            for b in 0..nbr {
                for (j, &i) in idx.iter().enumerate() {
                    let r = b * idx.len() + j;
                    let (all, lpos, lneg) = (lp[r][0], lp[r][1], lp[r][2]);
                    scores[b * n + i] = lpos - lneg;
                    mass[b * n + i] = (lpos - all).exp() + (lneg - all).exp();
                }
            }
        }
        Ok((scores, mass))
    }

    /// For each row of final-normed states: [logsumexp over the vocabulary, then over each id set] (f64).
    fn row_logsumexp(&self, finals: &[f32], rows: usize, sets: &[&[u32]]) -> Result<Vec<Vec<f64>>> {
        let (d, v) = (self.model.cfg.d_model, self.model.cfg.vocab);
        let chunk = (1 << 24) / v.max(1) + 1;
        let mut out = Vec::with_capacity(rows);
        for start in (0..rows).step_by(chunk) {
            let m = chunk.min(rows - start);
            let logits = self.model.logits(&finals[start * d..(start + m) * d], m)?;
            let part: Vec<Vec<f64>> = logits
                .par_chunks(v)
                .map(|row| {
                    let mut r = vec![lse(row.iter().copied())];
                    for s in sets {
                        r.push(lse(s.iter().map(|&t| row[t as usize])));
                    }
                    r
                })
                .collect();
            out.extend(part);
        }
        Ok(out)
    }

    /// log p(token at position t+1 | tokens ≤ t) for t in `from[i]..len−1`, per branch and sequence: a list of
    /// (branches × n) vectors (row-major: branch b, sequence i at b·n + i), nats.
    pub fn token_logprobs(
        &self,
        seqs: &[Vec<u32>],
        from: &[usize],
        branches: &[Steer],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self.token_pass(seqs, from, branches, batch, None)?.0)
    }

    /// [`Engine::token_logprobs`] and, at the same positions, KL(p_ref ‖ p_b) in nats: p_b the next-token
    /// distribution of branch b on `seqs[i]` at position `from[i] + j`, p_ref that of the unsteered model on
    /// `refs.0[i]` at `refs.1[i] + j` (`refs` None: `seqs`, `from`). Returns (logprobs, kls), both laid out as
    /// `token_logprobs`.
    ///
    /// # Errors
    /// [`EngineError::Input`] when a reference sequence has another number of read positions than its sequence,
    /// the lists' lengths differ, or as [`Engine::token_logprobs`].
    pub fn token_stats(
        &self,
        seqs: &[Vec<u32>],
        from: &[usize],
        branches: &[Steer],
        batch: usize,
        refs: Option<(&[Vec<u32>], &[usize])>,
    ) -> Result<TokenStats> {
        self.token_pass(seqs, from, branches, batch, Some(refs.unwrap_or((seqs, from))))
    }

    /// Log-probs and, with `refs`, KL to the unsteered model on the reference sequences (see `token_stats`).
    /// Per batch, the reference rows are the base branch of this pass (when `refs` are `seqs`, `from`) or of a
    /// separate base pass over the reference sequences; logits are made a chunk of rows at a time.
    fn token_pass(
        &self,
        seqs: &[Vec<u32>],
        from: &[usize],
        branches: &[Steer],
        batch: usize,
        refs: Option<(&[Vec<u32>], &[usize])>,
    ) -> Result<TokenStats> {
        let (n, nbr, d, v) = (seqs.len(), branches.len(), self.model.cfg.d_model, self.model.cfg.vocab);
        if from.len() != n {
            return Err(EngineError::Input(format!("{} start positions for {n} sequences", from.len())));
        }
        if let Some((rs, rf)) = refs {
            if rs.len() != n || rf.len() != n {
                return Err(EngineError::Input(format!(
                    "{} reference sequences and {} reference starts for {n} sequences",
                    rs.len(),
                    rf.len()
                )));
            }
            for i in 0..n {
                if rs[i].is_empty() {
                    return Err(EngineError::Input(format!("reference sequence {i} is empty")));
                }
                let (a, b) = (read_range(&seqs[i], from[i]), read_range(&rs[i], rf[i]));
                if a.1 - a.0 != b.1 - b.0 {
                    return Err(EngineError::Input(format!(
                        "sequence {i}: {} positions to read after start {} but its reference has {} after start {}",
                        a.1 - a.0,
                        from[i],
                        b.1 - b.0,
                        rf[i]
                    )));
                }
            }
        }
        if nbr == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut res = vec![Vec::new(); nbr * n];
        let mut kls = vec![Vec::new(); if refs.is_some() { nbr * n } else { 0 }];
        let side = self.side_factors(branches)?;
        // The base branch of the pass itself serves as reference when the references are the sequences.
        let own =
            refs.filter(|&(rs, rf)| rs == seqs && rf == from).and(branches.iter().position(|b| *b == Steer::Base));
        let base_side = self.side_factors(&[Steer::Base])?;
        let chunk = ((1 << 24) / v.max(1) + 1).max(1);
        for idx in Self::batches(seqs, batch) {
            let sub: Vec<&[u32]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
            let read: Vec<(usize, usize)> = idx.iter().map(|&i| read_range(&seqs[i], from[i])).collect();
            let out = self.run(&sub, &read, branches, &side, &[], true)?;
            // rows per branch; every branch reads the same positions
            let per = out.offsets[idx.len()];
            let ref_pass;
            let ref_rows: Option<&[f32]> = match (refs, own) {
                (None, _) => None,
                (Some(_), Some(b)) => Some(&out.finals[b * per * d..(b + 1) * per * d]),
                (Some((rs, rf)), None) => {
                    let rsub: Vec<&[u32]> = idx.iter().map(|&i| rs[i].as_slice()).collect();
                    let rread: Vec<(usize, usize)> = idx.iter().map(|&i| read_range(&rs[i], rf[i])).collect();
                    ref_pass = self.run(&rsub, &rread, &[Steer::Base], &base_side, &[], true)?.finals;
                    Some(&ref_pass)
                }
            };
            // targets in the (i, pos) order of one branch's rows
            let mut targets = Vec::with_capacity(per);
            for (s, r) in sub.iter().zip(&read) {
                targets.extend(s[r.0 + 1..r.1 + 1].iter().copied());
            }
            let mut lps = vec![0f32; nbr * per];
            let mut kl = vec![0f32; nbr * per];
            for start in (0..per).step_by(chunk) {
                let m = chunk.min(per - start);
                // reference rows as probabilities, with (lse, Σ p·logit, Σ p) per row
                let reference = match ref_rows {
                    Some(f) => {
                        let mut probs = self.model.logits(&f[start * d..(start + m) * d], m)?;
                        let sums: Vec<KlRef> = probs.par_chunks_mut(v).map(kl_reference).collect();
                        Some((probs, sums))
                    }
                    None => None,
                };
                for b in 0..nbr {
                    let r0 = b * per + start;
                    let logits = self.model.logits(&out.finals[r0 * d..(r0 + m) * d], m)?;
                    logits
                        .par_chunks(v)
                        .zip(targets[start..start + m].par_iter())
                        .zip(lps[r0..r0 + m].par_iter_mut().zip(kl[r0..r0 + m].par_iter_mut()))
                        .enumerate()
                        .for_each(|(r, ((row, &t), (lp, k)))| {
                            let z = lse(row.iter().copied());
                            *lp = (row[t as usize] as f64 - z) as f32;
                            if let Some((probs, sums)) = &reference {
                                *k = kl_to(&probs[r * v..(r + 1) * v], sums[r], row, z) as f32;
                            }
                        });
                }
            }
            for b in 0..nbr {
                for (j, &i) in idx.iter().enumerate() {
                    let k = b * idx.len() + j;
                    let span = out.offsets[k]..out.offsets[k + 1];
                    res[b * n + i] = lps[span.clone()].to_vec();
                    if refs.is_some() {
                        kls[b * n + i] = kl[span].to_vec();
                    }
                }
            }
        }
        Ok((res, kls))
    }

    /// Decoder-block outputs (the residual stream after block ℓ) at one position of each sequence: `positions[i]`
    /// (0-based token index), or the last token when `positions` is None. Returns (layers, branches, n, d)
    /// row-major, f32. The pass stops after the highest requested block.
    ///
    /// # Errors
    /// [`EngineError::Input`] if `positions` has another length than `seqs` or a position is past its sequence's
    /// end, a layer is out of range, or a sequence is empty.
    pub fn hidden(
        &self,
        seqs: &[Vec<u32>],
        layers: &[usize],
        branches: &[Steer],
        batch: usize,
        positions: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        let (n, nbr, d) = (seqs.len(), branches.len(), self.model.cfg.d_model);
        if let Some(p) = positions {
            if p.len() != n {
                return Err(EngineError::Input(format!("positions has {} entries for {n} sequences", p.len())));
            }
            if let Some(i) = (0..n).find(|&i| p[i] >= seqs[i].len()) {
                return Err(EngineError::Input(format!(
                    "positions[{i}] = {} is past sequence {i}'s {} tokens",
                    p[i],
                    seqs[i].len()
                )));
            }
        }
        let mut res = vec![0f32; layers.len() * nbr * n * d];
        let side = self.side_factors(branches)?;
        for idx in Self::batches(seqs, batch) {
            let sub: Vec<&[u32]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
            let read: Vec<(usize, usize)> = idx
                .iter()
                .map(|&i| {
                    let at = positions.map_or(seqs[i].len().saturating_sub(1), |p| p[i]);
                    (at, at + 1)
                })
                .collect();
            let out = self.run(&sub, &read, branches, &side, layers, false)?;
            for (li, cap) in out.captured.iter().enumerate() {
                for b in 0..nbr {
                    for (j, &i) in idx.iter().enumerate() {
                        let src = &cap[(b * idx.len() + j) * d..(b * idx.len() + j + 1) * d];
                        let dst = ((li * nbr + b) * n + i) * d;
                        res[dst..dst + d].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(res)
    }
}

/// (log-probs, KLs): per-token vectors, branch-major (branch b, sequence i at b·n + i).
pub type TokenStats = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// log Σ exp(x) in f64.
pub(super) fn lse(x: impl Iterator<Item = f32> + Clone) -> f64 {
    let m = x.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// A reference row for [`kl_to`]: (logsumexp of its logits, Σ p·logit, Σ p), f64.
pub(super) type KlRef = (f64, f64, f64);

/// Turn a logit row into its softmax p (f32, in place) and return its [`KlRef`].
pub(super) fn kl_reference(row: &mut [f32]) -> KlRef {
    let logits = row.to_vec();
    let z = lse(logits.iter().copied());
    row.iter_mut().for_each(|x| *x = (*x as f64 - z).exp() as f32);
    (z, pdot(row, &logits), row.iter().map(|&p| p as f64).sum())
}

/// KL(p ‖ q) = Σ p (log p − log q) in nats, from the reference probabilities `p` with their [`KlRef`] and a logit
/// row `q` with its logsumexp: (Σ p·ℓ_p − Σ p·ℓ_q) − Σ p·(lse_p − lse_q), no exponentials per row. Exactly 0
/// when `q` holds the reference's own logits (the same dot product is formed twice).
pub(super) fn kl_to(p: &[f32], (lse_p, a, s): KlRef, q: &[f32], lse_q: f64) -> f64 {
    ((a - pdot(p, q)) - s * (lse_p - lse_q)).max(0.0)
}

/// Σ p·x in f64 over the entries with p ≠ 0 (so a −∞ logit of probability 0 adds nothing).
pub(super) fn pdot(p: &[f32], x: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    for (pc, xc) in p.chunks(4).zip(x.chunks(4)) {
        for k in 0..pc.len() {
            if pc[k] != 0.0 {
                acc[k] += pc[k] as f64 * xc[k] as f64;
            }
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_util::lcg;

    /// kl_to of logit rows `p`, `q` (reference `p`).
    fn kl(p: &[f32], q: &[f32]) -> f64 {
        let mut probs = p.to_vec();
        let r = kl_reference(&mut probs);
        kl_to(&probs, r, q, lse(q.iter().copied()))
    }

    #[test]
    fn kl_matches_a_naive_loop() {
        let mut state = 7u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        for v in [1usize, 2, 3, 17, 300, 5000] {
            let p: Vec<f32> = (0..v).map(|_| rnd()).collect();
            let q: Vec<f32> = (0..v).map(|_| rnd() + 20.0).collect();
            let got = kl(&p, &q);
            // naive: normalise both to probabilities, then Σ p ln(p / q)
            let zp: f64 = p.iter().map(|&x| (x as f64).exp()).sum();
            let zq: f64 = q.iter().map(|&x| (x as f64).exp()).sum();
            let mut want = 0.0;
            for k in 0..v {
                let (pk, qk) = ((p[k] as f64).exp() / zp, (q[k] as f64).exp() / zq);
                want += pk * (pk / qk).ln();
            }
            // p is kept in f32: relative error ~1e-7 of Σ p |log p − log q|
            assert!((got - want.max(0.0)).abs() < 1e-6 * (1.0 + want), "v {v}: {got} vs {want}");
            if v > 1 {
                assert!(got > 0.01);
            }
            // a row against itself: exactly 0; shifted by a constant (the same distribution): ~0
            assert_eq!(kl(&p, &p), 0.0);
            let s: Vec<f32> = p.iter().map(|x| x + 3.0).collect();
            assert!(kl(&p, &s) < 1e-6);
        }
        // a zero-probability entry of p contributes nothing (no NaN), even against a −∞ logit
        let got = kl(&[0.0, f32::NEG_INFINITY], &[0.0, 1.0]);
        let want = (1.0f64 + 1f64.exp()).ln();
        assert!((got - want).abs() < 1e-7, "{got} vs {want}");
        assert!((kl(&[0.0, f32::NEG_INFINITY], &[0.0, f32::NEG_INFINITY])).abs() < 1e-12);
    }

    #[test]
    fn lse_matches_a_naive_sum_and_survives_large_and_infinite_entries() {
        let mut rnd = lcg(3, 20.0);
        for v in [1usize, 2, 7, 1000] {
            let x: Vec<f32> = (0..v).map(|_| rnd()).collect();
            let want = x.iter().map(|&a| (a as f64).exp()).sum::<f64>().ln();
            assert!((lse(x.iter().copied()) - want).abs() < 1e-9 * (1.0 + want.abs()));
        }
        // no overflow where exp(x) would: 1000 + ln 2
        assert!((lse([1000.0f32, 1000.0].into_iter()) - (1000.0 + 2f64.ln())).abs() < 1e-9);
        assert!((lse([f32::NEG_INFINITY, 0.0].into_iter())).abs() < 1e-12);
        assert_eq!(lse([f32::NEG_INFINITY; 3].into_iter()), f64::NEG_INFINITY);
    }
}
