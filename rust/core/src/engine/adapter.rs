//! The InnerPiSSA adapter read from its saved directory (`adapter_config.json` + `adapter_model.safetensors`, as
//! written by `innerpissa.adapter.Adapter.save`) and its r×r steering matrix (docs/design.md §2):
//!
//! ```text
//! A = triu(θ, 1) − triu(θ, 1)ᵀ            R(c) = (I − cA/2)⁻¹ (I + cA/2)       (Cayley)
//! M(c) = diag(S') R(c)ᵀ − diag(S),        S' = S + cδ (additive) or S ⊙ exp(cδ) (multiplicative)
//!        (its transpose R(c) diag(S') − diag(S) when the rotation turns U: `rotate_side = "u"`)
//! y(c) = base(x) + ((x V) M(c)ᵀ) Uᵀ
//! ```
//!
//! U, S, V come from the file; nothing is re-decomposed. M(c) is computed in f64 (faer LU) and rounded to f32.

use std::path::Path;

use candle_core::{Device, Tensor};
use faer::linalg::solvers::Solve;
use faer::{Mat, MatMut, MatRef};

use rayon::prelude::*;

use super::model::{gemm_par, Par};
use super::{EngineError, Result};

/// Which residual writer of a decoder block an adapted layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Attention output projection (`o_proj`, GGUF `attn_output`).
    Attn,
    /// MLP down projection (`down_proj`, GGUF `ffn_down`).
    Mlp,
}

/// Which singular vectors the Cayley rotation turns (`adapter.rotate` and `adapter.rotate_side`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// No rotation: M(c) = diag(S' − S).
    None,
    /// V, the input side (the default): M(c) = diag(S') R(c)ᵀ − diag(S).
    V,
    /// U, the output side: M(c) = R(c) diag(S') − diag(S), the transpose of the V form.
    U,
}

/// One adapted linear layer: U (d_out, r), S (r), V (d_in, r), θ (r, r), δ (r), all row-major f32.
#[derive(Clone, Debug)]
pub struct LowRankLayer {
    pub name: String,
    pub block: usize,
    pub writer: Writer,
    pub d_out: usize,
    pub d_in: usize,
    pub r: usize,
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub v: Vec<f32>,
    pub theta: Vec<f32>,
    pub delta: Vec<f32>,
}

/// A whole adapter.
#[derive(Clone, Debug)]
pub struct LowRankAdapter {
    pub layers: Vec<LowRankLayer>,
    /// `base_fingerprint` of adapter_config.json: sha256 (64 lowercase hex digits) over the targeted base
    /// weights, as `innerpissa.adapter.model.fingerprint` computes it. Required, as Python's `load_adapter` does.
    pub base_fingerprint: String,
    pub multiplicative: bool,
    pub rotation: Rotation,
}

/// Block index and writer of a module name such as `model.layers.12.mlp.down_proj`: the integer after the
/// `layers`/`h`/`blocks` component, and attention when a component names attention, else the MLP.
pub fn parse_target(name: &str) -> Result<(usize, Writer)> {
    let parts: Vec<&str> = name.split('.').collect();
    let block = parts
        .windows(2)
        .find(|w| matches!(w[0], "layers" | "h" | "blocks" | "layer" | "blk"))
        .and_then(|w| w[1].parse::<usize>().ok())
        .ok_or_else(|| EngineError::Format(format!("adapter target {name:?}: no decoder block index in the name")))?;
    let last = parts.last().copied().unwrap_or("");
    let attn = parts.iter().any(|p| p.contains("attn") || p.contains("attention"));
    let known =
        ["o_proj", "out_proj", "down_proj", "dense", "c_proj", "fc2", "dense_4h_to_h", "attn_output", "ffn_down"];
    if !known.contains(&last) {
        return Err(EngineError::Format(format!(
            "adapter target {name:?}: not a residual writer the Rust engine knows ({known:?})"
        )));
    }
    Ok((block, if attn { Writer::Attn } else { Writer::Mlp }))
}

/// The `base_fingerprint` value if it is a sha256 hex digest (64 lowercase hex digits), else what is wrong.
fn check_fingerprint(v: &serde_json::Value) -> std::result::Result<String, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("must be a string (a sha256 hex digest), got {}", char_prefix(&v.to_string(), 80)))?;
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(s.to_owned())
    } else {
        Err(format!("must be 64 lowercase hex digits (a sha256 digest), got {:?}", char_prefix(s, 80)))
    }
}

/// At most the first `n` characters of `s` (never splits a character), with "…" when cut.
pub(crate) fn char_prefix(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn tensor_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl LowRankAdapter {
    /// Read an adapter directory.
    ///
    /// Errors name the file and field: a missing file, invalid JSON, a missing tensor, or inconsistent shapes.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let w_path = dir.join("adapter_model.safetensors");
        for p in [&cfg_path, &w_path] {
            if !p.exists() {
                return Err(EngineError::Io(format!("{} not found: not an innerpissa adapter directory", p.display())));
            }
        }
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::Io(format!("{}: {e}", cfg_path.display())))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Format(format!("{}: invalid JSON ({e})", cfg_path.display())))?;
        let field = |k: &str| {
            cfg.get(k).ok_or_else(|| EngineError::Format(format!("{}: missing field '{k}'", cfg_path.display())))
        };
        // The fields Python's `load_adapter` requires, checked in its order before anything else is read.
        let adapter = field("adapter")?;
        let targets = field("target_modules")?;
        let base_fingerprint = check_fingerprint(field("base_fingerprint")?)
            .map_err(|e| EngineError::Format(format!("{}: base_fingerprint {e}", cfg_path.display())))?;
        let scale = adapter.get("scale").and_then(|v| v.as_str()).unwrap_or("additive");
        let multiplicative = match scale {
            "additive" => false,
            "multiplicative" => true,
            s => return Err(EngineError::Format(format!("{}: adapter.scale {s:?} unknown", cfg_path.display()))),
        };
        let rotate = adapter.get("rotate").and_then(|v| v.as_bool()).unwrap_or(true);
        let rotation = match (rotate, adapter.get("rotate_side").and_then(|v| v.as_str()).unwrap_or("v")) {
            (false, _) => Rotation::None,
            (true, "v") => Rotation::V,
            (true, "u") => Rotation::U,
            (true, side) => {
                return Err(EngineError::Format(format!(
                    "{}: adapter.rotate_side {side:?} unknown (use \"v\" or \"u\")",
                    cfg_path.display()
                )))
            }
        };
        let targets: Vec<String> = targets
            .as_array()
            .ok_or_else(|| EngineError::Format(format!("{}: target_modules is not a list", cfg_path.display())))?
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| EngineError::Format(format!("{}: target_modules holds a non-string", cfg_path.display())))?;
        let tensors = candle_core::safetensors::load(&w_path, &Device::Cpu)
            .map_err(|e| EngineError::Format(format!("{}: {e}", w_path.display())))?;
        let mut layers = Vec::with_capacity(targets.len());
        for name in targets {
            let (block, writer) = parse_target(&name)?;
            let get = |k: &str| {
                tensors
                    .get(&format!("{name}.{k}"))
                    .ok_or_else(|| EngineError::Format(format!("{}: missing tensor {name}.{k}", w_path.display())))
            };
            let (u, s, v) = (get("U")?, get("S")?, get("V")?);
            let (theta, delta) = (get("theta")?, get("delta")?);
            let r = match s.dims() {
                &[r] if r > 0 => r,
                dims => {
                    return Err(EngineError::Format(format!(
                        "{}: tensor {name}.S has shape {dims:?}, expected [r] with r > 0",
                        w_path.display()
                    )))
                }
            };
            let (d_out, d_in) = match (u.dims(), v.dims()) {
                (&[d_out, ru], &[d_in, rv]) if ru == r && rv == r && d_out > 0 && d_in > 0 => (d_out, d_in),
                (ud, vd) => {
                    return Err(EngineError::Format(format!(
                        "{}: tensors {name}.U {ud:?} and {name}.V {vd:?} should be [d_out, {r}] and [d_in, {r}] \
                         ({name}.S has rank {r})",
                        w_path.display()
                    )))
                }
            };
            for (k, t, want) in [("theta", theta, vec![r, r]), ("delta", delta, vec![r])] {
                if t.dims() != want.as_slice() {
                    return Err(EngineError::Format(format!(
                        "{}: tensor {name}.{k} has shape {:?}, expected {want:?} ({name}.S has rank {r})",
                        w_path.display(),
                        t.dims()
                    )));
                }
            }
            let finite = |k: &str, t: &Tensor| -> Result<Vec<f32>> {
                let x = tensor_vec(t)?;
                if x.iter().any(|v| !v.is_finite()) {
                    return Err(EngineError::Format(format!(
                        "{}: tensor {name}.{k} holds non-finite values (NaN or infinity)",
                        w_path.display()
                    )));
                }
                Ok(x)
            };
            if layers.iter().any(|l: &LowRankLayer| l.block == block && l.writer == writer) {
                return Err(EngineError::Format(format!(
                    "{}: target_modules names block {block}'s {writer:?} writer twice ({name})",
                    cfg_path.display()
                )));
            }
            layers.push(LowRankLayer {
                name: name.clone(),
                block,
                writer,
                d_out,
                d_in,
                r,
                u: finite("U", u)?,
                s: finite("S", s)?,
                v: finite("V", v)?,
                theta: finite("theta", theta)?,
                delta: finite("delta", delta)?,
            });
        }
        if layers.is_empty() {
            return Err(EngineError::Format(format!("{}: no target modules", cfg_path.display())));
        }
        Ok(Self { layers, base_fingerprint, multiplicative, rotation })
    }

    /// The lowest adapted block.
    pub fn first_block(&self) -> usize {
        self.layers.iter().map(|l| l.block).min().unwrap_or(usize::MAX)
    }
}

impl LowRankLayer {
    /// M(c), (r, r) row-major, f64. M(0) = 0 exactly.
    pub fn steer_matrix(&self, c: f64, multiplicative: bool, rotation: Rotation) -> Vec<f64> {
        let r = self.r;
        let s_new: Vec<f64> = (0..r)
            .map(|i| {
                let (s, d) = (self.s[i] as f64, self.delta[i] as f64);
                if multiplicative {
                    s * (c * d).exp()
                } else {
                    s + c * d
                }
            })
            .collect();
        // R(c)ᵀ
        let rot_t: Vec<f64> = if rotation != Rotation::None && c != 0.0 {
            let a = |i: usize, j: usize| -> f64 {
                if j > i {
                    self.theta[i * r + j] as f64
                } else if i > j {
                    -(self.theta[j * r + i] as f64)
                } else {
                    0.0
                }
            };
            let lhs = Mat::<f64>::from_fn(r, r, |i, j| (if i == j { 1.0 } else { 0.0 }) - c * a(i, j) / 2.0);
            let rhs = Mat::<f64>::from_fn(r, r, |i, j| (if i == j { 1.0 } else { 0.0 }) + c * a(i, j) / 2.0);
            let rot = lhs.partial_piv_lu().solve(&rhs);
            let mut out = vec![0.0; r * r];
            for i in 0..r {
                for j in 0..r {
                    out[i * r + j] = rot[(j, i)];
                }
            }
            out
        } else {
            (0..r * r).map(|k| if k / r == k % r { 1.0 } else { 0.0 }).collect()
        };
        let mut m = vec![0.0; r * r];
        for i in 0..r {
            for j in 0..r {
                m[i * r + j] = s_new[i] * rot_t[i * r + j] - if i == j { self.s[i] as f64 } else { 0.0 };
            }
        }
        if rotation == Rotation::U {
            for i in 0..r {
                for j in 0..i {
                    m.swap(i * r + j, j * r + i);
                }
            }
        }
        m
    }

    /// The side path at coefficient c as P = V M(c)ᵀ (d_in, r), row-major f32, so that Δy = (x P) Uᵀ.
    /// Returns None at c = 0 (the path is skipped and the output is the base output).
    pub fn factor(&self, c: f64, multiplicative: bool, rotation: Rotation) -> Option<Vec<f32>> {
        if c == 0.0 {
            return None;
        }
        let r = self.r;
        let m = self.steer_matrix(c, multiplicative, rotation);
        let m32: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        let mut p = vec![0f32; self.d_in * r];
        // P = V · M(c)ᵀ
        super::model::matmul_nt(&mut p, &self.v, &m32, self.d_in, r, r, false);
        Some(p)
    }

    /// The side path: out (rows, d_out) += (x P) Uᵀ for x (rows, d_in) and P = [`Self::factor`] (d_in, r), all
    /// row-major. Two thin matmuls, O(rows·r·(d_in + d_out)) flops instead of re-forming W(c) (d_out, d_in).
    /// Rows are independent, so they are split into one block per rayon thread, each multiplied sequentially:
    /// faer's own parallel split of these thin products was up to 4.6x slower at 64 rows (`cargo bench`
    /// `side_path`, docs/benchmarks.md).
    ///
    /// # Panics
    /// If a slice is shorter than its stated shape.
    pub fn apply_side(&self, p: &[f32], x: &[f32], rows: usize, out: &mut [f32]) {
        let (d_in, d_out, r) = (self.d_in, self.d_out, self.r);
        let block = rows.div_ceil(rayon::current_num_threads()).max(16);
        let ut = MatRef::from_row_major_slice(&self.u, d_out, r).transpose();
        let pr = MatRef::from_row_major_slice(p, d_in, r);
        x[..rows * d_in].par_chunks(block * d_in).zip(out[..rows * d_out].par_chunks_mut(block * d_out)).for_each(
            |(xb, ob)| {
                let n = xb.len() / d_in;
                let mut xp = vec![0f32; n * r];
                let xr = MatRef::from_row_major_slice(xb, n, d_in);
                gemm_par(MatMut::from_row_major_slice_mut(&mut xp, n, r), xr, pr, false, Par::Seq);
                let o = MatMut::from_row_major_slice_mut(ob, n, d_out);
                gemm_par(o, MatRef::from_row_major_slice(&xp, n, r), ut, true, Par::Seq);
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(r: usize) -> LowRankLayer {
        let f = |i: usize| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.3;
        LowRankLayer {
            name: "model.layers.3.mlp.down_proj".into(),
            block: 3,
            writer: Writer::Mlp,
            d_out: 5,
            d_in: 4,
            r,
            u: (0..5 * r).map(f).collect(),
            s: (0..r).map(|i| 2.0 - i as f32 * 0.3).collect(),
            v: (0..4 * r).map(|i| f(i + 3)).collect(),
            theta: (0..r * r).map(|i| f(i + 11)).collect(),
            delta: (0..r).map(|i| f(i + 17)).collect(),
        }
    }

    #[test]
    fn zero_coefficient_gives_zero_matrix() {
        let l = layer(3);
        for mult in [false, true] {
            assert!(l.steer_matrix(0.0, mult, Rotation::V).iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn rotation_is_orthogonal_and_inverts() {
        // With δ = 0 and S = 1, M(c) + I = R(c)ᵀ; R(c) R(−c) = I.
        let mut l = layer(3);
        l.s = vec![1.0; 3];
        l.delta = vec![0.0; 3];
        let r = 3;
        let p = l.steer_matrix(0.7, false, Rotation::V);
        let n = l.steer_matrix(-0.7, false, Rotation::V);
        let rt = |m: &Vec<f64>, i: usize, j: usize| m[i * r + j] + if i == j { 1.0 } else { 0.0 };
        for i in 0..r {
            for j in 0..r {
                // (R(c)ᵀ R(c))_ij = Σ_k Rᵀ_ik R_kj = Σ_k Rᵀ_ik Rᵀ_jk
                let orth: f64 = (0..r).map(|k| rt(&p, i, k) * rt(&p, j, k)).sum();
                let inv: f64 = (0..r).map(|k| rt(&p, i, k) * rt(&n, k, j)).sum();
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((orth - e).abs() < 1e-12, "orth {orth}");
                assert!((inv - e).abs() < 1e-12, "inv {inv}");
            }
        }
    }

    #[test]
    fn rotating_u_transposes_the_steering_matrix() {
        let l = layer(4);
        let (v, u) = (l.steer_matrix(0.6, false, Rotation::V), l.steer_matrix(0.6, false, Rotation::U));
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(u[i * 4 + j], v[j * 4 + i]);
            }
        }
    }

    #[test]
    fn no_rotation_additive_is_linear() {
        let l = layer(4);
        let m1 = l.steer_matrix(1.0, false, Rotation::None);
        let m3 = l.steer_matrix(-3.0, false, Rotation::None);
        for (a, b) in m1.iter().zip(&m3) {
            assert!((b + 3.0 * a).abs() < 1e-12);
        }
    }

    #[test]
    fn side_path_equals_dense_update_for_any_row_split() {
        // out += x (U M(c) Vᵀ)ᵀ = x V M(c)ᵀ Uᵀ, row by row, whatever the rows' split into per-thread blocks.
        let l = layer(3);
        let c = 0.8;
        let m = l.steer_matrix(c, false, Rotation::V);
        let p = l.factor(c, false, Rotation::V).unwrap();
        for rows in [1, 17, 40] {
            let x: Vec<f32> = (0..rows * l.d_in).map(|i| ((i * 31 % 23) as f32 - 11.0) / 7.0).collect();
            let mut out = vec![0.5f32; rows * l.d_out];
            l.apply_side(&p, &x, rows, &mut out);
            for t in 0..rows {
                for o in 0..l.d_out {
                    // Δy_o = Σ_{a,b,i} U_oa M_ab V_ib x_i
                    let mut want = 0.5f64;
                    for a in 0..l.r {
                        for b in 0..l.r {
                            let xv: f64 = (0..l.d_in).map(|i| l.v[i * l.r + b] as f64 * x[t * l.d_in + i] as f64).sum();
                            want += l.u[o * l.r + a] as f64 * m[a * l.r + b] * xv;
                        }
                    }
                    let got = out[t * l.d_out + o] as f64;
                    assert!((got - want).abs() < 1e-5, "rows {rows} t {t} o {o}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn fingerprint_must_be_a_sha256_hex_digest() {
        let ok = "0123456789abcdef".repeat(4);
        assert_eq!(check_fingerprint(&serde_json::json!(ok)).unwrap(), ok);
        for bad in [
            serde_json::json!(ok.to_uppercase()),
            serde_json::json!(&ok[..63]),
            serde_json::json!("é".repeat(64)),
            serde_json::json!(format!("0{}", "é".repeat(63))),
            serde_json::json!(123),
            serde_json::Value::Null,
        ] {
            assert!(check_fingerprint(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn char_prefix_never_splits_a_character() {
        assert_eq!(char_prefix("0éé", 2), "0é…");
        assert_eq!(char_prefix("abc", 12), "abc");
        assert_eq!(char_prefix(&"é".repeat(100), 80).chars().count(), 81);
    }

    #[test]
    fn parses_targets() {
        assert_eq!(parse_target("model.layers.12.mlp.down_proj").unwrap(), (12, Writer::Mlp));
        assert_eq!(parse_target("model.layers.0.self_attn.o_proj").unwrap(), (0, Writer::Attn));
        assert!(parse_target("model.layers.1.mlp.up_proj").is_err());
        assert!(parse_target("lm_head").is_err());
    }
}
