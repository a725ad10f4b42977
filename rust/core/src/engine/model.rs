//! A GGUF decoder (Llama family and Gemma 3) built from candle's public pieces: `gguf_file` to read the file,
//! `QTensor`/`QMatMul` for (de)quantized weights and matmuls. Norms, rotary embeddings and attention are written
//! here on plain `f32` rows because the sweep needs what candle's own model files hide: every layer, a packed
//! (padding-free) batch with a shared prompt prefix, per-branch steering and hidden-state capture.
//!
//! Conventions follow the GGUF files written by llama.cpp's converter: Llama q/k rows are permuted for
//! interleaved rotary pairs (so rope is applied to pairs (2i, 2i+1)); Gemma 3 stores its RMS-norm weights
//! with the +1 already added, uses NEOX rotary pairs (i, i + d/2), a sliding window on five of every six layers
//! (rope base 10 000 there, `rope.freq_base` on the global layers), q/k norms and post-attention/post-MLP norms.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
pub(crate) use faer::Par;
use faer::{Accum, MatMut, MatRef};

use super::config::{Arch, ModelConfig, WeightMode};
use super::{EngineError, Result};

/// How a linear layer multiplies.
enum Kernel {
    /// f32 W (d_out, d_in) row-major on the host, multiplied with faer (measured 3–4× candle's f32 matmul on
    /// these CPUs; see docs/benchmarks.md).
    Dense(Arc<Vec<f32>>),
    /// candle: quantized blocks (or an f32 tensor on a CUDA device).
    Candle(QMatMul),
}

/// A linear layer y = x Wᵀ, W (d_out, d_in), in one of the [`WeightMode`]s.
pub struct Linear {
    kernel: Kernel,
    pub d_in: usize,
    pub d_out: usize,
    device: Device,
}

/// y (m, n) = x (m, k) · wᵀ with w (n, k), all row-major; added to y when `accumulate`.
pub fn matmul_nt(y: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    let xr = MatRef::from_row_major_slice(x, m, k);
    let wr = MatRef::from_row_major_slice(w, n, k);
    gemm(MatMut::from_row_major_slice_mut(y, m, n), xr, wr.transpose(), accumulate);
}

/// y (m, n) (+)= a (m, k) · b (k, n) for faer views (any strides), on the rayon pool.
pub(crate) fn gemm(y: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f32>, accumulate: bool) {
    let par =
        if a.nrows() * a.ncols() * b.ncols() < 1 << 18 { Par::Seq } else { Par::rayon(rayon::current_num_threads()) };
    gemm_par(y, a, b, accumulate, par);
}

/// `gemm` with an explicit parallelism (`Par::Seq` inside an outer rayon loop).
pub(crate) fn gemm_par(y: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f32>, accumulate: bool, par: Par) {
    let acc = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(y, acc, a, b, 1.0f32, par);
    match par {
        Par::Seq => clear_upper_state(),
        _ => {
            rayon::broadcast(|_| clear_upper_state());
            clear_upper_state();
        }
    }
}

/// `vzeroupper` on the calling thread, where the CPU has AVX.
///
/// faer's runtime-dispatched AVX/AVX-512 kernels can return with the upper halves of the vector registers
/// still in use. This crate is compiled for baseline x86-64, so its own loops (norms, rope, softmax, the MLP
/// activation, all calling libm) use legacy SSE encodings, and on this project's AMD EPYC machines every such
/// loop then ran about 5x slower (a scalar `exp` loop after one faer matmul: 0.12 s instead of 0.022 s for 25M
/// elements) until the upper state was cleared. [`gemm_par`] calls this on every thread faer may have used.
#[inline]
pub(crate) fn clear_upper_state() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        unsafe fn vzeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked at run time), the only requirement of `vzeroupper`.
            unsafe { vzeroupper() }
        }
    }
}

impl Linear {
    /// A linear layer from a GGUF/candle matrix `qt` (d_out, d_in), held as `mode` says on `device`.
    ///
    /// # Errors
    /// [`EngineError::Format`] if `qt` is not a matrix; candle errors from (de)quantization.
    pub fn from_qtensor(qt: QTensor, mode: WeightMode, device: &Device) -> Result<Self> {
        let dims = qt.shape().dims().to_vec();
        if dims.len() != 2 {
            return Err(EngineError::Format(format!("expected a matrix, got shape {dims:?}")));
        }
        let (d_out, d_in) = (dims[0], dims[1]);
        let kernel = match mode {
            WeightMode::F32 if device.is_cpu() => {
                Kernel::Dense(Arc::new(qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?))
            }
            WeightMode::F32 => Kernel::Candle(QMatMul::Tensor(qt.dequantize(device)?)),
            WeightMode::Native => Kernel::Candle(QMatMul::from_qtensor(qt)?),
            WeightMode::Q8_0 => {
                let w = qt.dequantize(device)?;
                if d_in % 32 == 0 {
                    Kernel::Candle(QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?)
                } else {
                    Kernel::Candle(QMatMul::Tensor(w))
                }
            }
        };
        Ok(Self { kernel, d_in, d_out, device: device.clone() })
    }

    /// y (n, d_out) = x (n, d_in) Wᵀ, row-major.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; n * self.d_out];
        self.forward_into(x, n, &mut y)?;
        Ok(y)
    }

    /// `forward` into a caller's buffer (its first n·d_out entries), so large activations are not re-allocated.
    pub fn forward_into(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let y = &mut y[..n * self.d_out];
        match &self.kernel {
            Kernel::Dense(w) => matmul_nt(y, &x[..n * self.d_in], w, n, self.d_in, self.d_out, false),
            Kernel::Candle(mm) => {
                let t = Tensor::from_slice(&x[..n * self.d_in], (n, self.d_in), &self.device)?;
                y.copy_from_slice(&mm.forward(&t)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}

/// One decoder block's weights.
pub struct Block {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    pub(crate) o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    pub(crate) down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
}

/// A loaded GGUF decoder.
pub struct Model {
    pub cfg: ModelConfig,
    /// Token embeddings (vocab, d), f32 row-major, on the host (shared with a tied output head).
    embed: Arc<Vec<f32>>,
    pub(crate) blocks: Vec<Block>,
    out_norm: Vec<f32>,
    lm_head: Linear,
    pub weights: WeightMode,
    path: std::path::PathBuf,
}

struct Reader<'a> {
    content: &'a gguf_file::Content,
    file: File,
    path: &'a Path,
    device: Device,
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has(name) {
            return Err(EngineError::Format(format!("{}: tensor {name} missing", self.path.display())));
        }
        Ok(self.content.tensor(&mut self.file, name, &self.device)?)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        if !self.has(name) {
            return Err(EngineError::Format(format!("{}: tensor {name} missing", self.path.display())));
        }
        let qt = self.content.tensor(&mut self.file, name, &Device::Cpu)?;
        Ok(qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn opt_vector(&mut self, name: &str) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.vector(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn linear(&mut self, name: &str, mode: WeightMode) -> Result<Linear> {
        let qt = self.qtensor(name)?;
        let dev = self.device.clone();
        Linear::from_qtensor(qt, mode, &dev)
    }
}

impl Model {
    /// Load a GGUF file. `device` is where the matmuls run (`Device::Cpu` unless built with `cuda`).
    ///
    /// Errors: unreadable file, unsupported architecture, or a missing tensor/metadata key (named).
    pub fn load(path: &Path, weights: WeightMode, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Format(format!("{}: not a readable GGUF file ({e})", path.display())))?;
        let cfg = ModelConfig::from_gguf(&content, path)?;
        cfg.check_tensors(&content, path)?;
        let mut rd = Reader { content: &content, file, path, device: device.clone() };
        let embed_q = rd.qtensor("token_embd.weight")?;
        let embed = Arc::new(embed_q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
        let lm_head = if rd.has("output.weight") {
            rd.linear("output.weight", weights)?
        } else if weights == WeightMode::F32 && device.is_cpu() {
            // tied output head: share the de-quantized table
            Linear { kernel: Kernel::Dense(embed.clone()), d_in: cfg.d_model, d_out: cfg.vocab, device: device.clone() }
        } else {
            Linear::from_qtensor(embed_q, weights, device)?
        };
        let gemma = cfg.arch == Arch::Gemma3;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{l}.{s}");
            blocks.push(Block {
                attn_norm: rd.vector(&p("attn_norm.weight"))?,
                q: rd.linear(&p("attn_q.weight"), weights)?,
                k: rd.linear(&p("attn_k.weight"), weights)?,
                v: rd.linear(&p("attn_v.weight"), weights)?,
                o: rd.linear(&p("attn_output.weight"), weights)?,
                q_norm: rd.opt_vector(&p("attn_q_norm.weight"))?,
                k_norm: rd.opt_vector(&p("attn_k_norm.weight"))?,
                post_attn_norm: if gemma { Some(rd.vector(&p("post_attention_norm.weight"))?) } else { None },
                ffn_norm: rd.vector(&p("ffn_norm.weight"))?,
                gate: rd.linear(&p("ffn_gate.weight"), weights)?,
                up: rd.linear(&p("ffn_up.weight"), weights)?,
                down: rd.linear(&p("ffn_down.weight"), weights)?,
                post_ffn_norm: if gemma { Some(rd.vector(&p("post_ffw_norm.weight"))?) } else { None },
            });
            let b = &blocks[l];
            if b.q.d_out != cfg.n_head * cfg.head_dim || b.k.d_out != cfg.n_kv_head * cfg.head_dim {
                return Err(EngineError::Format(format!(
                    "{}: blk.{l} q/k sizes {}/{} disagree with {} heads × {} (kv {})",
                    path.display(),
                    b.q.d_out,
                    b.k.d_out,
                    cfg.n_head,
                    cfg.head_dim,
                    cfg.n_kv_head
                )));
            }
        }
        let out_norm = rd.vector("output_norm.weight")?;
        Ok(Self { cfg, embed, blocks, out_norm, lm_head, weights, path: path.to_path_buf() })
    }

    /// Linear weights (d_out, d_in) as f32 row-major, as transformers holds them after de-quantization, read
    /// again from the file (one header read for all names). Only for unpermuted tensors (not q/k).
    pub fn weights_f32(&self, tensors: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut file = File::open(&self.path).map_err(|e| EngineError::Io(format!("{}: {e}", self.path.display())))?;
        let content = gguf_file::Content::read(&mut file)?;
        tensors
            .iter()
            .map(|t| {
                if !content.tensor_infos.contains_key(t) {
                    return Err(EngineError::Format(format!("{}: tensor {t} missing", self.path.display())));
                }
                let qt = content.tensor(&mut file, t, &Device::Cpu)?;
                Ok(qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
            })
            .collect()
    }

    /// Embedding rows (n, d) for token ids, scaled by √d for Gemma 3.
    pub(crate) fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let v = self.cfg.vocab as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= v) {
            return Err(EngineError::Input(format!("token id {bad} out of range for vocabulary size {v}")));
        }
        let d = self.cfg.d_model;
        let mut out = Vec::with_capacity(ids.len() * d);
        for &t in ids {
            out.extend_from_slice(&self.embed[t as usize * d..(t as usize + 1) * d]);
        }
        if self.cfg.embed_scale != 1.0 {
            let s = self.cfg.embed_scale;
            out.iter_mut().for_each(|x| *x *= s);
        }
        Ok(out)
    }

    /// Final RMS norm of rows (n, d), in place.
    pub(crate) fn final_norm(&self, x: &mut [f32]) {
        rms_norm_rows(x, &self.out_norm, self.cfg.eps);
    }

    /// Logits (n, vocab) of final-normed rows (n, d).
    pub(crate) fn logits(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.lm_head.forward(x, n)
    }
}

/// RMS norm of each row of `x` (rows of `w.len()`), in place: x · w / √(mean(x²) + eps).
pub(crate) fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    use rayon::prelude::*;
    let d = w.len();
    x.par_chunks_mut(d * 16).for_each(|rows| {
        for row in rows.chunks_exact_mut(d) {
            let ms = sum_sq(row) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (xi, wi) in row.iter_mut().zip(w) {
                *xi = *xi * inv * wi;
            }
        }
    });
}

#[inline]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in rest {
        s += v * v;
    }
    s
}

/// Rotary embedding tables for positions 0..n_pos: (cos, sin), each (n_pos, head_dim/2), f32 as transformers
/// computes them (inverse frequencies base^(−2i/d) in f32, angle = position · inv_freq in f32).
pub(crate) fn rope_tables(base: f32, head_dim: usize, n_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> =
        (0..half).map(|i| (1.0 / (base as f64).powf((2 * i) as f64 / head_dim as f64)) as f32).collect();
    let mut cos = vec![0f32; n_pos * half];
    let mut sin = vec![0f32; n_pos * half];
    for p in 0..n_pos {
        for i in 0..half {
            let a = (p as f32 * inv[i]) as f64;
            cos[p * half + i] = a.cos() as f32;
            sin[p * half + i] = a.sin() as f32;
        }
    }
    (cos, sin)
}

/// Apply rope in place to rows (n, heads·head_dim) at `positions` (n). Interleaved pairs (2i, 2i+1) or NEOX
/// pairs (i, i + d/2).
pub(crate) fn apply_rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    tables: &(Vec<f32>, Vec<f32>),
    neox: bool,
) {
    use rayon::prelude::*;
    let half = head_dim / 2;
    let w = heads * head_dim;
    x.par_chunks_mut(w).zip(positions.par_iter()).for_each(|(row, &p)| {
        let c = &tables.0[p * half..(p + 1) * half];
        let s = &tables.1[p * half..(p + 1) * half];
        for h in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (h[a], h[b]);
                h[a] = x0 * c[i] - x1 * s[i];
                h[b] = x0 * s[i] + x1 * c[i];
            }
        }
    });
}

/// Activation buffers of one packed pass, allocated once at the largest size (every branch copy): `h` the
/// normed input, `q`/`k`/`v`, `att` the attention output, `o` a writer's output, `g`/`u` the MLP's gate and up.
pub(crate) struct Buffers {
    pub h: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub att: Vec<f32>,
    pub o: Vec<f32>,
    pub g: Vec<f32>,
    pub u: Vec<f32>,
}

impl Buffers {
    /// Buffers for `rows` rows of a model of residual width `d` and block widths `(q, k/v, d_ff)`.
    pub(crate) fn new(rows: usize, d: usize, (qw, kw, fw): (usize, usize, usize)) -> Self {
        let z = |w: usize| vec![0f32; rows * w];
        Buffers { h: z(d), q: z(qw), k: z(kw), v: z(kw), att: z(qw), o: z(d), g: z(fw), u: z(fw) }
    }
}

/// The parts of a block the engine drives step by step.
impl Block {
    /// q, k, v of norm(x) (with Gemma's per-head q/k norms) into `ws.q`, `ws.k`, `ws.v` (their first n rows);
    /// `ws.h` is scratch.
    pub(crate) fn attn_in(&self, x: &[f32], n: usize, eps: f32, ws: &mut Buffers) -> Result<()> {
        let Buffers { h, q, k, v, .. } = ws;
        let h = &mut h[..x.len()];
        h.copy_from_slice(x);
        rms_norm_rows(h, &self.attn_norm, eps);
        self.q.forward_into(h, n, q)?;
        self.k.forward_into(h, n, k)?;
        self.v.forward_into(h, n, v)?;
        if let Some(w) = &self.q_norm {
            rms_norm_rows(&mut q[..n * self.q.d_out], w, eps);
        }
        if let Some(w) = &self.k_norm {
            rms_norm_rows(&mut k[..n * self.k.d_out], w, eps);
        }
        Ok(())
    }

    pub(crate) fn attn_out_norm(&self, o: &mut [f32], eps: f32) {
        if let Some(w) = &self.post_attn_norm {
            rms_norm_rows(o, w, eps);
        }
    }

    /// MLP input act(gate(h)) ⊙ up(h), h = norm(x), into `ws.g` (n, d_ff); `ws.h`, `ws.u` are scratch.
    pub(crate) fn mlp_in(&self, x: &[f32], n: usize, eps: f32, arch: Arch, ws: &mut Buffers) -> Result<()> {
        use rayon::prelude::*;
        let Buffers { h, g, u, .. } = ws;
        let h = &mut h[..x.len()];
        h.copy_from_slice(x);
        rms_norm_rows(h, &self.ffn_norm, eps);
        self.gate.forward_into(h, n, g)?;
        self.up.forward_into(h, n, u)?;
        let m = n * self.gate.d_out;
        // σ(t) = 1/(1 + e^(−t)) with t clamped at −80: e^80 is finite in f32, so libm's overflow path is never
        // taken; σ(−80) ≈ 2e-35, below anything that survives the multiply.
        let sigmoid = |t: f32| 1.0 / (1.0 + (-t.max(-80.0)).exp());
        let act = |g: &mut [f32], u: &[f32]| match arch {
            Arch::Llama => g.iter_mut().zip(u).for_each(|(gi, ui)| *gi = *gi * sigmoid(*gi) * ui),
            // gelu, tanh approximation: ½x(1 + tanh z) = x·σ(2z), z = √(2/π)(x + 0.044715x³); the sigmoid form
            // needs one exp instead of a tanh (the same function up to f32 rounding; 4x faster, docs/benchmarks.md).
            Arch::Gemma3 => g.iter_mut().zip(u).for_each(|(gi, ui)| {
                use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
                let x = *gi;
                // 2z = 2·√(2/π)·x(1 + 0.044715x²)
                *gi = x * sigmoid(2.0 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * x * (1.0 + 0.044715 * x * x)) * ui
            }),
        };
        g[..m].par_chunks_mut(4096).zip(u[..m].par_chunks(4096)).for_each(|(g, u)| act(g, u));
        Ok(())
    }

    pub(crate) fn widths(&self) -> (usize, usize, usize) {
        (self.q.d_out, self.k.d_out, self.gate.d_out)
    }

    pub(crate) fn mlp_out_norm(&self, y: &mut [f32], eps: f32) {
        if let Some(w) = &self.post_ffn_norm {
            rms_norm_rows(y, w, eps);
        }
    }

    pub(crate) fn rope_base(&self, cfg: &ModelConfig, l: usize) -> f32 {
        cfg.rope_base_of(l)
    }
}
