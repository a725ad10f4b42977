//! The sweep engine: one forward pass serves a whole coefficient sweep (docs/design.md §8).
//!
//! A batch of token sequences is packed without padding: the longest common prefix of the batch is stored once,
//! followed by each sequence's own tokens, and attention lets every sequence see the prefix rows and its own
//! earlier rows. Steering *branches* (a coefficient of the adapter, of a control vector, or none) share every
//! layer below the first steered one; there the packed rows are copied once per branch, and each branch applies
//! its own low-rank side path Δy = ((x V) M(c)ᵀ) Uᵀ to the adapted residual writers (or adds c·v to the
//! block output). Only the rows a readout needs reach the final norm and the output head.
//!
//! Readouts (`readouts`): Yes/No log-odds at the answer position ([`Engine::yes_no`]), per-token log-probabilities
//! ([`Engine::token_logprobs`]), those with the per-token KL from the unsteered model ([`Engine::token_stats`])
//! and decoder-block outputs ([`Engine::hidden`]). The packing is in `packing`, the attention over it in
//! `attention`, the model's weights and kernels in `model`, the adapter's side path in `adapter`.
//!
//! Each packed pass emits a `tracing` event at debug level (target `innerpissa_core::engine`) with its rows,
//! branches, prefix and the seconds spent in q/k/v, attention, o, the side path and the MLP; the Python extension
//! prints these to stderr when `IPISSA_PROFILE` is set.

pub mod adapter;
mod attention;
pub mod config;
pub mod model;
mod packing;
mod readouts;

use std::fmt;
use std::path::Path;

use candle_core::Device;
use rayon::prelude::*;

pub use adapter::{LowRankAdapter, LowRankLayer, Rotation, Writer};
pub use config::{Arch, ModelConfig, WeightMode};
pub use model::Model;
pub use readouts::TokenStats;

use attention::{packed_attention, AttnDims};
use packing::{pack, read_offsets, Layout, Packed};

/// Errors of the engine; each message names the file, field or argument at fault.
#[derive(Debug)]
pub enum EngineError {
    Io(String),
    Format(String),
    Input(String),
    Candle(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(s) | Self::Format(s) | Self::Input(s) => f.write_str(s),
            Self::Candle(s) => write!(f, "candle: {s}"),
        }
    }
}

impl std::error::Error for EngineError {}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// How one branch of a pass is steered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Steer {
    /// The unsteered model.
    Base,
    /// The loaded adapter at steering coefficient c.
    Adapter(f64),
    /// Control vector `index` (see [`Engine::add_control_vector`]) added as coeff·v to block outputs.
    Vector { index: usize, coeff: f32 },
}

/// Activation-addition directions: block ℓ's output += c·v_ℓ at every position.
#[derive(Clone, Debug)]
pub struct ControlVector {
    pub directions: Vec<(usize, Vec<f32>)>,
}

/// A model, at most one adapter, and any number of control vectors.
pub struct Engine {
    pub model: Model,
    adapter: Option<LowRankAdapter>,
    vectors: Vec<ControlVector>,
}

/// Rows a pass returns: for branch b and sequence i, positions `read[i].0 .. read[i].1`.
struct RunOut {
    /// Final-normed rows, ordered (branch, sequence, position); empty without `need_final`.
    finals: Vec<f32>,
    /// Start row of (b, i) in `finals`/`captured` (index b·n + i), and one past the end.
    offsets: Vec<usize>,
    /// Per capture layer: block outputs at the same rows.
    captured: Vec<Vec<f32>>,
}

/// One writer's side path: the layer, and per branch P = V M(c)ᵀ (None: that branch leaves the writer alone).
type WriterSide<'a> = Option<(&'a LowRankLayer, Vec<Option<Vec<f32>>>)>;

/// side[block][writer] (writer: [`Writer::Attn`], [`Writer::Mlp`]).
type SideFactors<'a> = Vec<[WriterSide<'a>; 2]>;

/// A rope (cos, sin) table, (positions, head_dim / 2) each.
type RopeTable = (Vec<f32>, Vec<f32>);

/// Rope (cos, sin) tables, one per rope base the pass's layers use (Gemma 3: local and global).
struct RopeCache(Vec<(f32, RopeTable)>);

impl RopeCache {
    fn table(&self, base: f32) -> &RopeTable {
        &self.0.iter().find(|t| t.0 == base).expect("rope table built for every layer of the pass").1
    }
}

/// What every block of one packed pass shares: the layout, the branch copies present, positions, head sizes.
struct Pass<'a> {
    lay: &'a Layout,
    /// Branch copies present at this block (1 below the first steered layer).
    nb: usize,
    /// Position of every row of the `nb` copies.
    positions: &'a [usize],
    dims: AttnDims,
    rope: &'a RopeCache,
}

/// Seconds a pass spent in q/k/v, attention, o, the side path and the MLP.
#[derive(Default)]
struct Profile([f64; 5]);

impl Engine {
    /// Load a GGUF model for CPU (or, with the `cuda` feature, `device = "cuda"`).
    pub fn load(path: &Path, weights: WeightMode, device: &str) -> Result<Self> {
        let device = match device {
            "cpu" => Device::Cpu,
            "cuda" => Device::new_cuda(0).map_err(|e| {
                EngineError::Input(format!(
                    "device 'cuda' unavailable ({e}); build with the cuda feature on a CUDA machine"
                ))
            })?,
            other => return Err(EngineError::Input(format!("device must be 'cpu' or 'cuda', got {other:?}"))),
        };
        let model = Model::load(path, weights, &device)?;
        Ok(Self { model, adapter: None, vectors: Vec::new() })
    }

    /// Attach an adapter (replacing any previous one). Errors when its shapes do not fit the model.
    pub fn set_adapter(&mut self, adapter: LowRankAdapter) -> Result<()> {
        for l in &adapter.layers {
            let blk = self.model.blocks.get(l.block).ok_or_else(|| {
                EngineError::Input(format!(
                    "adapter layer {} targets block {} of a {}-block model",
                    l.name,
                    l.block,
                    self.model.blocks.len()
                ))
            })?;
            let lin = match l.writer {
                Writer::Attn => &blk.o,
                Writer::Mlp => &blk.down,
            };
            if lin.d_in != l.d_in || lin.d_out != l.d_out {
                return Err(EngineError::Input(format!(
                    "adapter layer {}: V/U give ({}, {}) but the model's weight is ({}, {}): made for another model",
                    l.name, l.d_out, l.d_in, lin.d_out, lin.d_in
                )));
            }
        }
        // As Python's `load_adapter`: the fingerprint of the targeted base weights must equal the saved one.
        let got = self.fingerprint(&adapter)?;
        if got != adapter.base_fingerprint {
            return Err(EngineError::Input(format!(
                "adapter was made for another model: the fingerprint of its target weights differs \
                 (this model {}, adapter base_fingerprint {})",
                adapter::char_prefix(&got, 12),
                adapter::char_prefix(&adapter.base_fingerprint, 12)
            )));
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// sha256 over the names, shapes and f32 values of the adapter's target weights (adapter/model.py
    /// `fingerprint`; names sorted, shape written as a Python tuple).
    fn fingerprint(&self, adapter: &LowRankAdapter) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut layers: Vec<&LowRankLayer> = adapter.layers.iter().collect();
        layers.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<String> = layers
            .iter()
            .map(|l| match l.writer {
                Writer::Attn => format!("blk.{}.attn_output.weight", l.block),
                Writer::Mlp => format!("blk.{}.ffn_down.weight", l.block),
            })
            .collect();
        let weights = self.model.weights_f32(&names)?;
        let mut h = Sha256::new();
        for (l, w) in layers.iter().zip(&weights) {
            h.update(format!("{}|({}, {})|", l.name, l.d_out, l.d_in).as_bytes());
            for x in w {
                h.update(x.to_le_bytes());
            }
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn adapter(&self) -> Option<&LowRankAdapter> {
        self.adapter.as_ref()
    }

    /// Register a control vector; returns its index for [`Steer::Vector`].
    pub fn add_control_vector(&mut self, v: ControlVector) -> Result<usize> {
        for (l, dir) in &v.directions {
            if *l >= self.model.cfg.n_layer || dir.len() != self.model.cfg.d_model {
                return Err(EngineError::Input(format!(
                    "control vector direction for block {l} has {} entries; the model has {} blocks of width {}",
                    dir.len(),
                    self.model.cfg.n_layer,
                    self.model.cfg.d_model
                )));
            }
        }
        self.vectors.push(v);
        Ok(self.vectors.len() - 1)
    }

    pub fn clear_control_vectors(&mut self) {
        self.vectors.clear();
    }

    fn first_steered(&self, s: &Steer) -> Result<usize> {
        Ok(match *s {
            Steer::Base => usize::MAX,
            Steer::Adapter(c) => {
                let a = self
                    .adapter
                    .as_ref()
                    .ok_or_else(|| EngineError::Input("an adapter branch needs an adapter (set_adapter)".into()))?;
                if c == 0.0 {
                    usize::MAX
                } else {
                    a.first_block()
                }
            }
            Steer::Vector { index, coeff } => {
                let v =
                    self.vectors.get(index).ok_or_else(|| EngineError::Input(format!("no control vector {index}")))?;
                if coeff == 0.0 {
                    usize::MAX
                } else {
                    v.directions.iter().map(|d| d.0).min().unwrap_or(usize::MAX)
                }
            }
        })
    }

    /// Side-path factors for every adapted layer and branch, built once per call (not per batch):
    /// side[block][writer] = per branch Option<(P, Uᵀ)>.
    fn side_factors(&self, branches: &[Steer]) -> Result<SideFactors<'_>> {
        let cfg = &self.model.cfg;
        let mut side: SideFactors = (0..cfg.n_layer).map(|_| [None, None]).collect();
        if let Some(a) = &self.adapter {
            if branches.iter().any(|b| matches!(b, Steer::Adapter(c) if *c != 0.0)) {
                let all: Vec<Vec<Option<Vec<f32>>>> = a
                    .layers
                    .par_iter()
                    .map(|l| {
                        branches
                            .iter()
                            .map(|b| match b {
                                Steer::Adapter(c) => l.factor(*c, a.multiplicative, a.rotation),
                                _ => None,
                            })
                            .collect()
                    })
                    .collect();
                for (l, per) in a.layers.iter().zip(all) {
                    side[l.block][l.writer as usize] = Some((l, per));
                }
            }
        }
        Ok(side)
    }

    /// One packed pass over `seqs` for every branch. `read[i]` = (from, to) positions to return.
    fn run(
        &self,
        seqs: &[&[u32]],
        read: &[(usize, usize)],
        branches: &[Steer],
        side: &SideFactors,
        capture: &[usize],
        need_final: bool,
    ) -> Result<RunOut> {
        let cfg = &self.model.cfg;
        let (d, n, nbr) = (cfg.d_model, seqs.len(), branches.len());
        if n == 0 || nbr == 0 {
            return Ok(RunOut { finals: vec![], offsets: vec![0; n * nbr + 1], captured: vec![vec![]; capture.len()] });
        }
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(EngineError::Input(format!("sequence {i} is empty")));
            }
            let (a, b) = read[i];
            if a > b || b > s.len() {
                return Err(EngineError::Input(format!(
                    "sequence {i}: read range {a}..{b} outside its {} tokens",
                    s.len()
                )));
            }
        }
        if let Some(&l) = capture.iter().find(|&&l| l >= cfg.n_layer) {
            return Err(EngineError::Input(format!("capture layer {l} out of range for {} blocks", cfg.n_layer)));
        }
        let Packed { lay, tokens, positions } = pack(seqs, read);
        let (p, rows) = (lay.prefix, lay.rows);
        let max_pos = seqs.iter().map(|s| s.len()).max().unwrap_or(1);

        let mut first = usize::MAX;
        for b in branches {
            first = first.min(self.first_steered(b)?);
        }
        let last_layer = if need_final { cfg.n_layer } else { capture.iter().max().map_or(0, |&l| l + 1) };

        let mut rope = RopeCache(Vec::new());
        for l in 0..last_layer {
            let base = self.model.blocks[l].rope_base(cfg, l);
            if !rope.0.iter().any(|t| t.0 == base) {
                rope.0.push((base, model::rope_tables(base, cfg.head_dim, max_pos)));
            }
        }

        let dims =
            AttnDims { n_head: cfg.n_head, n_kv_head: cfg.n_kv_head, head_dim: cfg.head_dim, scale: cfg.attn_scale };
        let mut prof = Profile::default();
        let t_run = std::time::Instant::now();
        let mut x = self.model.embed(&tokens)?;
        let mut nb = 1usize;
        let mut pos_all = positions.clone();
        let most = if first < last_layer { nbr * rows } else { rows };
        let mut ws = model::Buffers::new(most, d, self.model.blocks[0].widths());
        let mut captured: Vec<Vec<f32>> = Vec::with_capacity(capture.len());
        let mut cap_store: Vec<(usize, Vec<f32>)> = Vec::new();
        debug_assert!(side.len() >= last_layer, "side factors for every block of the pass");
        for (l, side_l) in side.iter().enumerate().take(last_layer) {
            if l == first && nbr > 1 {
                x = x.repeat(nbr);
                pos_all = positions.repeat(nbr);
                nb = nbr;
            }
            let pass = Pass { lay: &lay, nb, positions: &pos_all, dims, rope: &rope };
            self.block(l, &mut x, &mut ws, &pass, side_l, &mut prof)?;
            self.add_vectors(l, &mut x, branches, nb, rows);
            if capture.contains(&l) {
                cap_store.push((l, self.gather(&x, &lay, read, nb, nbr)));
            }
        }
        for &l in capture {
            let k = cap_store.iter().position(|c| c.0 == l).expect("captured");
            captured.push(cap_store[k].1.clone());
        }
        let offsets = read_offsets(read, nbr);
        tracing::debug!(
            rows,
            branches = nb,
            prefix = p,
            qkv_s = prof.0[0],
            attn_s = prof.0[1],
            o_s = prof.0[2],
            side_s = prof.0[3],
            mlp_s = prof.0[4],
            total_s = t_run.elapsed().as_secs_f64(),
            "packed pass"
        );
        let finals = if need_final {
            let mut f = self.gather(&x, &lay, read, nb, nbr);
            self.model.final_norm(&mut f);
            f
        } else {
            Vec::new()
        };
        Ok(RunOut { finals, offsets, captured })
    }

    /// One decoder block over the packed rows `x` (all `pass.nb` branch copies), in place: attention, its writer
    /// with each branch's side path, then the MLP likewise.
    fn block(
        &self,
        l: usize,
        x: &mut [f32],
        ws: &mut model::Buffers,
        pass: &Pass<'_>,
        side: &[WriterSide<'_>; 2],
        prof: &mut Profile,
    ) -> Result<()> {
        let cfg = &self.model.cfg;
        let (d, nb, rows) = (cfg.d_model, pass.nb, pass.lay.rows);
        let nrows = nb * rows;
        let blk = &self.model.blocks[l];
        let (qw, kw, fw) = blk.widths();
        let t0 = std::time::Instant::now();
        blk.attn_in(x, nrows, cfg.eps, ws)?;
        prof.0[0] += t0.elapsed().as_secs_f64();
        let (q, k) = (&mut ws.q[..nrows * qw], &mut ws.k[..nrows * kw]);
        let tab = pass.rope.table(blk.rope_base(cfg, l));
        let neox = cfg.arch == Arch::Gemma3;
        model::apply_rope(q, cfg.n_head, cfg.head_dim, pass.positions, tab, neox);
        model::apply_rope(k, cfg.n_kv_head, cfg.head_dim, pass.positions, tab, neox);
        let window = if cfg.is_sliding(l) { cfg.sliding_window } else { None };
        let t0 = std::time::Instant::now();
        packed_attention(q, k, &ws.v[..nrows * kw], pass.lay, nb, window, pass.dims, &mut ws.att[..nrows * qw]);
        prof.0[1] += t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let o = &mut ws.o[..nrows * d];
        blk.o.forward_into(&ws.att, nrows, o)?;
        prof.0[2] += t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        self.side_path(&side[Writer::Attn as usize], &ws.att[..nrows * qw], o, nb, rows)?;
        prof.0[3] += t0.elapsed().as_secs_f64();
        blk.attn_out_norm(o, cfg.eps);
        add_into(x, o);
        let t0 = std::time::Instant::now();
        blk.mlp_in(x, nrows, cfg.eps, cfg.arch, ws)?;
        let y = &mut ws.o[..nrows * d];
        blk.down.forward_into(&ws.g, nrows, y)?;
        prof.0[4] += t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        self.side_path(&side[Writer::Mlp as usize], &ws.g[..nrows * fw], y, nb, rows)?;
        prof.0[3] += t0.elapsed().as_secs_f64();
        blk.mlp_out_norm(y, cfg.eps);
        add_into(x, y);
        Ok(())
    }

    /// c·v added to the rows of every branch that steers with a control vector having a direction at block `l`.
    fn add_vectors(&self, l: usize, x: &mut [f32], branches: &[Steer], nb: usize, rows: usize) {
        let d = self.model.cfg.d_model;
        for (b, branch) in branches.iter().enumerate().take(nb) {
            let &Steer::Vector { index, coeff } = branch else { continue };
            if coeff == 0.0 {
                continue;
            }
            if let Some((_, dir)) = self.vectors[index].directions.iter().find(|d| d.0 == l) {
                x[b * rows * d..(b + 1) * rows * d].par_chunks_mut(d).for_each(|row| {
                    for (xi, vi) in row.iter_mut().zip(dir) {
                        *xi += coeff * vi;
                    }
                });
            }
        }
    }

    /// Rows (branch, sequence, read positions) of the packed state `x` holding `nb` branch copies.
    fn gather(&self, x: &[f32], lay: &Layout, read: &[(usize, usize)], nb: usize, nbr: usize) -> Vec<f32> {
        let d = self.model.cfg.d_model;
        let mut out = Vec::new();
        for b in 0..nbr {
            let base = if nb == 1 { 0 } else { b * lay.rows };
            for (i, &(from, to)) in read.iter().enumerate() {
                for pos in from..to {
                    let r = base + lay.row(i, pos);
                    out.extend_from_slice(&x[r * d..(r + 1) * d]);
                }
            }
        }
        out
    }

    /// Δy = (x P) Uᵀ added to each branch's rows of `out` (x: the writer's input rows).
    fn side_path(
        &self,
        factors: &WriterSide<'_>,
        input: &[f32],
        out: &mut [f32],
        nb: usize,
        rows: usize,
    ) -> Result<()> {
        let Some((layer, per)) = factors else { return Ok(()) };
        let (d_in, d_out) = (layer.d_in, layer.d_out);
        for b in 0..nb {
            let Some(p) = &per[b] else { continue };
            layer.apply_side(
                p,
                &input[b * rows * d_in..(b + 1) * rows * d_in],
                rows,
                &mut out[b * rows * d_out..(b + 1) * rows * d_out],
            );
        }
        Ok(())
    }

    /// Sequence order that puts shared prefixes next to each other, cut into batches of `batch` sequences.
    fn batches(seqs: &[Vec<u32>], batch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by(|&a, &b| seqs[a].cmp(&seqs[b]));
        order.chunks(batch.max(1)).map(|c| c.to_vec()).collect()
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(8192).zip(y.par_chunks(8192)).for_each(|(a, b)| {
        for (ai, bi) in a.iter_mut().zip(b) {
            *ai += bi;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::test_util::lcg;
    use super::*;

    #[test]
    fn rope_matches_the_rotation_formula_and_depends_only_on_relative_position() {
        let (heads, hd, n_pos, base) = (2usize, 8usize, 40usize, 10000f32);
        let tables = model::rope_tables(base, hd, n_pos);
        let mut rnd = lcg(5, 2.0);
        for neox in [false, true] {
            let x: Vec<f32> = (0..heads * hd).map(|_| rnd()).collect();
            let y: Vec<f32> = (0..heads * hd).map(|_| rnd()).collect();
            let at = |row: &[f32], p: usize| {
                let mut r = row.to_vec();
                model::apply_rope(&mut r, heads, hd, &[p], &tables, neox);
                r
            };
            // the formula: pair (a, b) of frequency θ_i = base^(−2i/hd) turned by p·θ_i
            let p = 17usize;
            let got = at(&x, p);
            for h in 0..heads {
                for i in 0..hd / 2 {
                    let (a, b) = if neox { (i, i + hd / 2) } else { (2 * i, 2 * i + 1) };
                    let th = p as f64 * (base as f64).powf(-2.0 * i as f64 / hd as f64);
                    let (x0, x1) = (x[h * hd + a] as f64, x[h * hd + b] as f64);
                    assert!((got[h * hd + a] as f64 - (x0 * th.cos() - x1 * th.sin())).abs() < 1e-5);
                    assert!((got[h * hd + b] as f64 - (x0 * th.sin() + x1 * th.cos())).abs() < 1e-5);
                }
            }
            // position 0 is the identity; q(p)·k(p') depends on p − p' only
            assert_eq!(at(&x, 0), x);
            let dot = |p: usize, p2: usize| -> f64 {
                at(&x, p).iter().zip(at(&y, p2)).map(|(a, b)| *a as f64 * b as f64).sum()
            };
            for (p, p2) in [(5usize, 2usize), (30, 27), (12, 9)] {
                assert!((dot(p, p2) - dot(3, 0)).abs() < 1e-4, "neox {neox}: ({p}, {p2})");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values in [-scale/2, scale/2) (a 64-bit LCG; no rand dependency).
    pub(crate) fn lcg(seed: u64, scale: f32) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        }
    }
}
