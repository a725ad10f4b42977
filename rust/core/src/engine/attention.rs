//! Causal attention over the packed layout of [`super::packing`]: every sequence attends to the shared prefix rows
//! and to its own earlier rows, in every branch copy, with an optional sliding window.

use faer::{MatMut, MatRef};
use rayon::prelude::*;

use super::model;
use super::packing::Layout;

/// Head counts and score scale of [`packed_attention`].
#[derive(Clone, Copy)]
pub(super) struct AttnDims {
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
    pub(super) scale: f32,
}

/// One attention work unit: `len` query rows from `row` (a branch copy's shared prefix, or one sequence's own
/// rows), which see `pre_len` prefix rows from `pre_row` and then themselves; `p0` is the position of the first.
struct Unit {
    row: usize,
    len: usize,
    pre_row: usize,
    pre_len: usize,
    p0: usize,
}

/// Causal attention over the packed layout (softmax in f32), `nb` branch copies of it, keys within `window`
/// positions when given (sliding-window layers). q (N, H·hd), k/v (N, H_kv·hd) → (N, H·hd).
#[allow(clippy::too_many_arguments)]
pub(super) fn packed_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lay: &Layout,
    nb: usize,
    window: Option<usize>,
    dims: AttnDims,
    out: &mut [f32],
) {
    let (nh, nkv, hd) = (dims.n_head, dims.n_kv_head, dims.head_dim);
    let mut units = Vec::new();
    for b in 0..nb {
        let base = b * lay.rows;
        if lay.prefix > 0 {
            units.push(Unit { row: base, len: lay.prefix, pre_row: base, pre_len: 0, p0: 0 });
        }
        for i in 0..lay.starts.len() {
            units.push(Unit {
                row: base + lay.starts[i],
                len: lay.lens[i],
                pre_row: base,
                pre_len: lay.prefix,
                p0: lay.prefix,
            });
        }
    }
    let mut slices: Vec<&mut [f32]> = Vec::with_capacity(units.len());
    let mut rest: &mut [f32] = out;
    for u in &units {
        let (head, tail) = rest.split_at_mut(u.len * nh * hd);
        slices.push(head);
        rest = tail;
    }
    let group = nh / nkv;
    let scale = dims.scale;
    units.par_iter().zip(slices.into_par_iter()).for_each(|(u, o)| {
        // Per head: scores S = Q Kᵀ over [prefix keys | own keys] (T × nk), masked softmax, O = S V.
        // Heads are gathered into contiguous blocks first so every matmul is dense row-major.
        let (qs, ks, nk, t_len) = (nh * hd, nkv * hd, u.pre_len + u.len, u.len);
        let mut sc = vec![0f32; t_len * nk];
        let mut qh = vec![0f32; t_len * hd];
        let mut kh = vec![0f32; nk * hd];
        let mut vh = vec![0f32; nk * hd];
        let mut oh = vec![0f32; t_len * hd];
        let seq = model::Par::Seq;
        let key_row = |j: usize| if j < u.pre_len { u.pre_row + j } else { u.row + j - u.pre_len };
        for g in 0..nkv {
            for j in 0..nk {
                let r = key_row(j);
                kh[j * hd..(j + 1) * hd].copy_from_slice(&k[r * ks + g * hd..r * ks + (g + 1) * hd]);
                vh[j * hd..(j + 1) * hd].copy_from_slice(&v[r * ks + g * hd..r * ks + (g + 1) * hd]);
            }
            for h in g * group..(g + 1) * group {
                for t in 0..t_len {
                    let r = u.row + t;
                    qh[t * hd..(t + 1) * hd].copy_from_slice(&q[r * qs + h * hd..r * qs + (h + 1) * hd]);
                }
                model::gemm_par(
                    MatMut::from_row_major_slice_mut(&mut sc, t_len, nk),
                    MatRef::from_row_major_slice(&qh, t_len, hd),
                    MatRef::from_row_major_slice(&kh, nk, hd).transpose(),
                    false,
                    seq,
                );
                for t in 0..t_len {
                    let qpos = u.p0 + t;
                    let row = &mut sc[t * nk..(t + 1) * nk];
                    let mut m = f32::NEG_INFINITY;
                    for (j, s) in row.iter_mut().enumerate() {
                        let (kpos, causal) =
                            if j < u.pre_len { (j, true) } else { (u.p0 + j - u.pre_len, j - u.pre_len <= t) };
                        *s = if causal && window.is_none_or(|w| qpos - kpos < w) {
                            *s * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                        m = m.max(*s);
                    }
                    let mut z = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - m).exp();
                        z += *s;
                    }
                    let inv = 1.0 / z;
                    row.iter_mut().for_each(|s| *s *= inv);
                }
                model::gemm_par(
                    MatMut::from_row_major_slice_mut(&mut oh, t_len, hd),
                    MatRef::from_row_major_slice(&sc, t_len, nk),
                    MatRef::from_row_major_slice(&vh, nk, hd),
                    false,
                    seq,
                );
                for t in 0..t_len {
                    o[t * qs + h * hd..t * qs + (h + 1) * hd].copy_from_slice(&oh[t * hd..(t + 1) * hd]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packing::{pack, Packed};
    use crate::engine::test_util::lcg;

    /// Causal softmax attention of one unpacked sequence, f64: q (T, H·hd), k/v (T, Hkv·hd) → (T, H·hd).
    fn naive_attention(q: &[f32], k: &[f32], v: &[f32], t_len: usize, d: AttnDims, window: Option<usize>) -> Vec<f64> {
        let (nh, nkv, hd) = (d.n_head, d.n_kv_head, d.head_dim);
        let mut out = vec![0f64; t_len * nh * hd];
        for h in 0..nh {
            let g = h / (nh / nkv);
            for t in 0..t_len {
                let keys: Vec<usize> = (0..=t).filter(|&j| window.is_none_or(|w| t - j < w)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|e| q[t * nh * hd + h * hd + e] as f64 * k[j * nkv * hd + g * hd + e] as f64)
                            .sum::<f64>()
                            * d.scale as f64
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (&j, s) in keys.iter().zip(&scores) {
                    let w = (s - m).exp() / z;
                    for e in 0..hd {
                        out[t * nh * hd + h * hd + e] += w * v[j * nkv * hd + g * hd + e] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn packed_attention_equals_per_sequence_causal_attention() {
        // grouped-query heads, a shared prefix, two branch copies with different values, with and without a window
        let dims = AttnDims { n_head: 4, n_kv_head: 2, head_dim: 8, scale: 0.35 };
        let (qs, ks) = (dims.n_head * dims.head_dim, dims.n_kv_head * dims.head_dim);
        let seqs: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4, 5, 6], vec![1, 2, 3, 7], vec![1, 2, 3, 8, 9, 10, 11, 12, 13]];
        let views: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let read: Vec<(usize, usize)> = seqs.iter().map(|s| (s.len() - 1, s.len())).collect();
        let Packed { lay, .. } = pack(&views, &read);
        assert_eq!(lay.prefix, 3);
        let nb = 2;
        let mut rnd = lcg(11, 2.0);
        let q: Vec<f32> = (0..nb * lay.rows * qs).map(|_| rnd()).collect();
        let k: Vec<f32> = (0..nb * lay.rows * ks).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..nb * lay.rows * ks).map(|_| rnd()).collect();
        for window in [None, Some(1), Some(3), Some(100)] {
            let mut out = vec![0f32; nb * lay.rows * qs];
            packed_attention(&q, &k, &v, &lay, nb, window, dims, &mut out);
            for b in 0..nb {
                for (i, s) in seqs.iter().enumerate() {
                    let rows: Vec<usize> = (0..s.len()).map(|pos| b * lay.rows + lay.row(i, pos)).collect();
                    let gather = |x: &[f32], w: usize| {
                        rows.iter().flat_map(|&r| x[r * w..(r + 1) * w].to_vec()).collect::<Vec<f32>>()
                    };
                    let want =
                        naive_attention(&gather(&q, qs), &gather(&k, ks), &gather(&v, ks), s.len(), dims, window);
                    let got = gather(&out, qs);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((*g as f64 - w).abs() < 1e-5, "branch {b} sequence {i} window {window:?}: {g} vs {w}");
                    }
                }
            }
        }
    }
}
