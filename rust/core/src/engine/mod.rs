//! The sweep engine: one forward pass serves a whole coefficient sweep (docs/design.md §8).
//!
//! A batch of token sequences is packed without padding: the longest common prefix of the batch is stored once,
//! followed by each sequence's own tokens, and attention lets every sequence see the prefix rows and its own
//! earlier rows. Steering *branches* (a coefficient of the adapter, of a control vector, or none) share every
//! layer below the first steered one; there the packed rows are copied once per branch, and each branch applies
//! its own low-rank side path Δy = ((x V) M(c)ᵀ) Uᵀ to the adapted residual writers (or adds c·v to the
//! block output). Only the rows a readout needs reach the final norm and the output head.
//!
//! Readouts: Yes/No log-odds at the answer position ([`Engine::yes_no`]), per-token log-probabilities
//! ([`Engine::token_logprobs`]), those with the per-token KL from the unsteered model ([`Engine::token_stats`])
//! and decoder-block outputs ([`Engine::hidden`]).
//!
//! Each packed pass emits a `tracing` event at debug level (target `innerpissa_core::engine`) with its rows,
//! branches, prefix and the seconds spent in q/k/v, attention, o, the side path and the MLP; the Python extension
//! prints these to stderr when `IPISSA_PROFILE` is set.

pub mod adapter;
pub mod model;

use std::fmt;
use std::path::Path;

use candle_core::Device;
use faer::{MatMut, MatRef};
use rayon::prelude::*;

pub use adapter::{LowRankAdapter, LowRankLayer, Rotation, Writer};
pub use model::{Arch, Model, ModelConfig, WeightMode};

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

/// Row layout of one branch of a packed batch: `prefix` shared rows, then each sequence's own rows.
struct Layout {
    prefix: usize,
    starts: Vec<usize>,
    lens: Vec<usize>,
    rows: usize,
}

impl Layout {
    fn row(&self, i: usize, pos: usize) -> usize {
        if pos < self.prefix {
            pos
        } else {
            self.starts[i] + pos - self.prefix
        }
    }
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

/// Length of the longest common prefix of `seqs` (non-empty slice of sequences).
fn lcp(seqs: &[&[u32]]) -> usize {
    let first = seqs[0];
    let mut p = first.len();
    for s in &seqs[1..] {
        p = p.min(s.iter().zip(first).take_while(|(a, b)| a == b).count());
    }
    p
}

/// One branch's packed rows: the layout, the token of each row and its position in its sequence.
struct Packed {
    lay: Layout,
    tokens: Vec<u32>,
    positions: Vec<usize>,
}

/// Pack `seqs` without padding: their common prefix once, then each sequence's own tokens. The prefix is cut short
/// so that every sequence keeps at least one own row and every row it reads (`read[i].0` on) is its own.
fn pack(seqs: &[&[u32]], read: &[(usize, usize)]) -> Packed {
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
fn read_offsets(read: &[(usize, usize)], nbr: usize) -> Vec<usize> {
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

/// Head counts and score scale of [`packed_attention`].
#[derive(Clone, Copy)]
struct AttnDims {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    scale: f32,
}

/// (log-probs, KLs): per-token vectors, branch-major (branch b, sequence i at b·n + i).
pub type TokenStats = (Vec<Vec<f32>>, Vec<Vec<f32>>);

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

struct Unit {
    row: usize,
    len: usize,
    pre_row: usize,
    pre_len: usize,
    p0: usize,
}

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

/// Causal attention over the packed layout (softmax in f32), `nb` branch copies of it, keys within `window`
/// positions when given (sliding-window layers). q (N, H·hd), k/v (N, H_kv·hd) → (N, H·hd).
#[allow(clippy::too_many_arguments)]
fn packed_attention(
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

fn add_into(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(8192).zip(y.par_chunks(8192)).for_each(|(a, b)| {
        for (ai, bi) in a.iter_mut().zip(b) {
            *ai += bi;
        }
    });
}

/// log Σ exp(x) in f64.
fn lse(x: impl Iterator<Item = f32> + Clone) -> f64 {
    let m = x.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.map(|v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// Positions read for a sequence of `s.len()` tokens from `from` on: `from..len−1` (clamped), as predictors.
fn read_range(s: &[u32], from: usize) -> (usize, usize) {
    let to = s.len().saturating_sub(1);
    (from.min(to), to)
}

/// A reference row for [`kl_to`]: (logsumexp of its logits, Σ p·logit, Σ p), f64.
type KlRef = (f64, f64, f64);

/// Turn a logit row into its softmax p (f32, in place) and return its [`KlRef`].
fn kl_reference(row: &mut [f32]) -> KlRef {
    let logits = row.to_vec();
    let z = lse(logits.iter().copied());
    row.iter_mut().for_each(|x| *x = (*x as f64 - z).exp() as f32);
    (z, pdot(row, &logits), row.iter().map(|&p| p as f64).sum())
}

/// KL(p ‖ q) = Σ p (log p − log q) in nats, from the reference probabilities `p` with their [`KlRef`] and a logit
/// row `q` with its logsumexp: (Σ p·ℓ_p − Σ p·ℓ_q) − Σ p·(lse_p − lse_q), no exponentials per row. Exactly 0
/// when `q` holds the reference's own logits (the same dot product is formed twice).
fn kl_to(p: &[f32], (lse_p, a, s): KlRef, q: &[f32], lse_q: f64) -> f64 {
    ((a - pdot(p, q)) - s * (lse_p - lse_q)).max(0.0)
}

/// Σ p·x in f64 over the entries with p ≠ 0 (so a −∞ logit of probability 0 adds nothing).
fn pdot(p: &[f32], x: &[f32]) -> f64 {
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

    /// Deterministic values in [-scale/2, scale/2) (a 64-bit LCG; no rand dependency).
    fn lcg(seed: u64, scale: f32) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        }
    }

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

    #[test]
    fn read_range_clamps() {
        assert_eq!(read_range(&[1, 2, 3, 4], 1), (1, 3));
        assert_eq!(read_range(&[1, 2, 3, 4], 9), (3, 3));
        assert_eq!(read_range(&[], 0), (0, 0));
    }
}
