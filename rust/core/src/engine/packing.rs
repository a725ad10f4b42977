//! Packing a batch of token sequences without padding: their longest common prefix once, then each sequence's own
//! rows (the layout every packed pass and [`super::attention::packed_attention`] share).

/// Row layout of one branch of a packed batch: `prefix` shared rows, then each sequence's own rows.
pub(super) struct Layout {
    pub(super) prefix: usize,
    pub(super) starts: Vec<usize>,
    pub(super) lens: Vec<usize>,
    pub(super) rows: usize,
}

impl Layout {
    pub(super) fn row(&self, i: usize, pos: usize) -> usize {
        if pos < self.prefix {
            pos
        } else {
            self.starts[i] + pos - self.prefix
        }
    }
}

/// Length of the longest common prefix of `seqs` (non-empty slice of sequences).
pub(super) fn lcp(seqs: &[&[u32]]) -> usize {
    let first = seqs[0];
    let mut p = first.len();
    for s in &seqs[1..] {
        p = p.min(s.iter().zip(first).take_while(|(a, b)| a == b).count());
    }
    p
}

/// One branch's packed rows: the layout, the token of each row and its position in its sequence.
pub(super) struct Packed {
    pub(super) lay: Layout,
    pub(super) tokens: Vec<u32>,
    pub(super) positions: Vec<usize>,
}

/// Pack `seqs` without padding: their common prefix once, then each sequence's own tokens. The prefix is cut short
/// so that every sequence keeps at least one own row and every row it reads (`read[i].0` on) is its own.
pub(super) fn pack(seqs: &[&[u32]], read: &[(usize, usize)]) -> Packed {
    let mut p = lcp(seqs);
    for (i, s) in seqs.iter().enumerate() {
        p = p.min(s.len() - 1).min(read[i].0);
    }
    let n = seqs.len();
    let (mut starts, mut lens) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut rows = p;
    let mut tokens: Vec<u32> = seqs[0][..p].to_vec();
    let mut positions: Vec<usize> = (0..p).collect();
    for s in seqs {
        starts.push(rows);
        lens.push(s.len() - p);
        rows += s.len() - p;
        tokens.extend_from_slice(&s[p..]);
        positions.extend(p..s.len());
    }
    Packed { lay: Layout { prefix: p, starts, lens, rows }, tokens, positions }
}

/// Start of each (branch, sequence)'s read rows in a pass's output, branch-major, and one past the end.
pub(super) fn read_offsets(read: &[(usize, usize)], nbr: usize) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(read.len() * nbr + 1);
    let mut acc = 0;
    for _ in 0..nbr {
        for r in read {
            offsets.push(acc);
            acc += r.1 - r.0;
        }
    }
    offsets.push(acc);
    offsets
}

/// Positions read for a sequence of `s.len()` tokens from `from` on: `from..len−1` (clamped), as predictors.
pub(super) fn read_range(s: &[u32], from: usize) -> (usize, usize) {
    let to = s.len().saturating_sub(1);
    (from.min(to), to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcp_is_the_longest_common_prefix() {
        assert_eq!(lcp(&[&[1, 2, 3], &[1, 2, 4], &[1, 2]]), 2);
        assert_eq!(lcp(&[&[5, 6], &[7]]), 0);
        assert_eq!(lcp(&[&[1, 2, 3]]), 3);
    }

    #[test]
    fn packing_puts_every_token_at_its_row_and_keeps_read_rows_own() {
        let seqs: Vec<Vec<u32>> = vec![vec![9, 8, 7, 1, 2], vec![9, 8, 7, 3], vec![9, 8, 7, 1, 2, 6, 6], vec![9, 8, 7]];
        for read_from in [0usize, 1, 2, 3] {
            let views: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
            let read: Vec<(usize, usize)> = seqs.iter().map(|s| read_range(s, read_from)).collect();
            let Packed { lay, tokens, positions } = pack(&views, &read);
            // the prefix is shared, leaves every sequence a row of its own, and no read row is in it
            assert!(lay.prefix <= 3 && lay.prefix <= read_from.min(2));
            assert_eq!(lay.rows, tokens.len());
            assert_eq!(lay.rows, lay.prefix + seqs.iter().map(|s| s.len() - lay.prefix).sum::<usize>());
            for (i, s) in seqs.iter().enumerate() {
                assert!(lay.lens[i] >= 1);
                for (pos, &tok) in s.iter().enumerate() {
                    let r = lay.row(i, pos);
                    assert_eq!((tokens[r], positions[r]), (tok, pos), "sequence {i} position {pos}");
                    if pos >= read[i].0 {
                        assert!(r >= lay.starts[i], "read row of sequence {i} sits in the shared prefix");
                    }
                }
            }
        }
    }

    #[test]
    fn read_offsets_are_branch_major_cumulative_counts() {
        assert_eq!(read_offsets(&[(0, 2), (1, 4)], 2), vec![0, 2, 5, 7, 10]);
        assert_eq!(read_offsets(&[(3, 3)], 1), vec![0, 0]);
    }

    #[test]
    fn read_range_clamps() {
        assert_eq!(read_range(&[1, 2, 3, 4], 1), (1, 3));
        assert_eq!(read_range(&[1, 2, 3, 4], 9), (3, 3));
        assert_eq!(read_range(&[], 0), (0, 0));
    }
}
