//! Criterion benchmarks of the sweep engine's kernels, on SmolLM2-135M shapes (d_model 576, d_ff 1536, the
//! default adapter rank 576 / 8 = 72), random weights from a fixed seed:
//!
//! * `side_path/*`: the adapter's low-rank side path Δy = (x P) Uᵀ ([`LowRankLayer::apply_side`]) on a
//!   `down_proj` (576 × 1536) against the base matmul it rides on (`base`, the f32 `Linear`) and against
//!   re-merging the weight for the coefficient, W(c) = W + U Pᵀ, then x W(c)ᵀ (`merged`). `side_path_factor`
//!   times building P = V M(c)ᵀ (Cayley solve in f64 included), done once per layer and coefficient per call.
//! * `matmul/*`: y = x Wᵀ for a 1536 × 576 `up_proj` with the weight held as the engine's modes hold it: `f32`
//!   (de-quantized, faer), `candle_f32` (the same f32 weight through candle's matmul), `q4_1` (the GGUF's
//!   Q4_1 blocks, candle's quantized kernel; SmolLM2's shipped GGUF is Q4_1) and `q8_0` (re-quantized).
//! * `svd/*`: [`top_r_svd`] at r = 72 on a 576 × 576 `o_proj` and a 576 × 1536 `down_proj`, in f64 (the
//!   default) and f32 working precision.
//!
//! Run: `cargo bench -p innerpissa-core --bench kernels` (thread count: `RAYON_NUM_THREADS`). After criterion's
//! own report the run prints each kernel's median time as a ratio to the baseline measured in the same run
//! (the f32 base matmul, the f32 faer matmul, the f64 SVD). Not run by CI.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion};
use innerpissa_core::engine::model::{matmul_nt, Linear};
use innerpissa_core::engine::{LowRankLayer, Rotation, WeightMode, Writer};
use innerpissa_core::{top_r_svd, MatrixView, Precision};

const D_MODEL: usize = 576;
const D_FF: usize = 1536;
const RANK: usize = 72;
/// Packed rows per pass: one decoding step, a small batch, a sweep batch (64 prompts of ~66 tokens share a
/// prefix, so a pass holds a few hundred to a few thousand rows per branch).
const ROWS: [usize; 4] = [1, 64, 512, 2048];

/// Deterministic values uniform in [-scale, scale) (xorshift64*), so every run times the same numbers.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

fn down_proj_layer() -> LowRankLayer {
    let (d_out, d_in, r) = (D_MODEL, D_FF, RANK);
    LowRankLayer {
        name: "model.layers.0.mlp.down_proj".into(),
        block: 0,
        writer: Writer::Mlp,
        d_out,
        d_in,
        r,
        u: values(d_out * r, 1, 0.08),
        s: (0..r).map(|i| 4.0 - 3.0 * i as f32 / r as f32).collect(),
        v: values(d_in * r, 2, 0.05),
        theta: values(r * r, 3, 0.02),
        delta: values(r, 4, 0.3),
    }
}

fn bench_side_path(c: &mut Criterion) {
    let layer = down_proj_layer();
    let (d_out, d_in) = (layer.d_out, layer.d_in);
    let w = values(d_out * d_in, 5, 0.04);
    let base = Linear::from_qtensor(
        QTensor::quantize(&Tensor::from_slice(&w, (d_out, d_in), &Device::Cpu).unwrap(), GgmlDType::F32).unwrap(),
        WeightMode::F32,
        &Device::Cpu,
    )
    .unwrap();
    let p = layer.factor(1.0, false, Rotation::V).expect("c = 1 has a side path");
    let mut g = c.benchmark_group("side_path");
    for rows in ROWS {
        let x = values(rows * d_in, 6 + rows as u64, 1.0);
        let mut y = vec![0f32; rows * d_out];
        g.bench_with_input(BenchmarkId::new("base", rows), &rows, |b, &rows| {
            b.iter(|| base.forward_into(black_box(&x), rows, &mut y).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("side", rows), &rows, |b, &rows| {
            b.iter(|| layer.apply_side(black_box(&p), black_box(&x), rows, &mut y))
        });
        let mut wc = vec![0f32; d_out * d_in];
        g.bench_with_input(BenchmarkId::new("merged", rows), &rows, |b, &rows| {
            b.iter(|| {
                wc.copy_from_slice(&w);
                matmul_nt(&mut wc, &layer.u, black_box(&p), d_out, layer.r, d_in, true);
                matmul_nt(&mut y, black_box(&x), &wc, rows, d_in, d_out, false);
            })
        });
    }
    g.finish();
    c.bench_function("side_path_factor", |b| b.iter(|| layer.factor(black_box(1.0), false, Rotation::V)));
}

fn bench_matmul(c: &mut Criterion) {
    let (d_out, d_in) = (D_FF, D_MODEL);
    let w = Tensor::from_slice(&values(d_out * d_in, 7, 0.04), (d_out, d_in), &Device::Cpu).unwrap();
    let q4_1 = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
    // The de-quantized reference holds exactly the Q4_1 weights, as the engine's f32 mode does on that GGUF.
    let f32_w = q4_1.dequantize(&Device::Cpu).unwrap();
    let dense = Linear::from_qtensor(QTensor::quantize(&f32_w, GgmlDType::F32).unwrap(), WeightMode::F32, &Device::Cpu)
        .unwrap();
    let native = Linear::from_qtensor(q4_1, WeightMode::Native, &Device::Cpu).unwrap();
    let q8 = Linear::from_qtensor(QTensor::quantize(&f32_w, GgmlDType::F32).unwrap(), WeightMode::Q8_0, &Device::Cpu)
        .unwrap();
    let candle_f32 = QMatMul::Tensor(f32_w.clone());
    let mut g = c.benchmark_group("matmul");
    for rows in ROWS {
        let x = values(rows * d_in, 8 + rows as u64, 1.0);
        let xt = Tensor::from_slice(&x, (rows, d_in), &Device::Cpu).unwrap();
        let mut y = vec![0f32; rows * d_out];
        g.bench_with_input(BenchmarkId::new("f32", rows), &rows, |b, &rows| {
            b.iter(|| dense.forward_into(black_box(&x), rows, &mut y).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("candle_f32", rows), &rows, |b, _| {
            b.iter(|| candle_f32.forward(black_box(&xt)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("q4_1", rows), &rows, |b, &rows| {
            b.iter(|| native.forward_into(black_box(&x), rows, &mut y).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("q8_0", rows), &rows, |b, &rows| {
            b.iter(|| q8.forward_into(black_box(&x), rows, &mut y).unwrap())
        });
    }
    g.finish();
}

fn bench_svd(c: &mut Criterion) {
    let mut g = c.benchmark_group("svd");
    g.sample_size(10);
    for (name, d_out, d_in) in [("o_proj", D_MODEL, D_MODEL), ("down_proj", D_MODEL, D_FF)] {
        let w = values(d_out * d_in, 9 + d_in as u64, 0.04);
        for (prec, label) in [(Precision::F64, "f64"), (Precision::F32, "f32")] {
            g.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter(|| top_r_svd(MatrixView::new(black_box(&w), d_out, d_in), RANK, prec).unwrap())
            });
        }
    }
    g.finish();
}

/// Median time (ns) of one benchmark from criterion's saved estimates, if it ran in this process (written after
/// `since`; a filtered run leaves older estimates on disk).
fn median_ns(dir: &Path, id: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(id).join("new").join("estimates.json");
    if std::fs::metadata(&path).ok()?.modified().ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// Each kernel's median as a ratio to its same-run baseline (skipped where a filter left either out).
fn print_ratios(dir: &Path, since: SystemTime) {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for rows in ROWS {
        for k in ["side", "merged"] {
            pairs.push((format!("side_path/{k}/{rows}"), format!("side_path/base/{rows}")));
        }
        for k in ["candle_f32", "q4_1", "q8_0"] {
            pairs.push((format!("matmul/{k}/{rows}"), format!("matmul/f32/{rows}")));
        }
    }
    for name in ["o_proj", "down_proj"] {
        pairs.push((format!("svd/f32/{name}"), format!("svd/f64/{name}")));
    }
    println!("\nmedian time / same-run baseline ({} threads):", rayon::current_num_threads());
    println!("{:<28} {:>12} {:<22} {:>12} {:>8}", "kernel", "median", "baseline", "median", "ratio");
    for (k, base) in pairs {
        if let (Some(t), Some(t0)) = (median_ns(dir, &k, since), median_ns(dir, &base, since)) {
            println!("{k:<28} {:>10.1}µs {base:<22} {:>10.1}µs {:>8.3}", t / 1e3, t0 / 1e3, t / t0);
        }
    }
}

fn main() {
    let since = SystemTime::now();
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("criterion");
    let mut c = Criterion::default().output_directory(&dir).configure_from_args();
    bench_side_path(&mut c);
    bench_matmul(&mut c);
    bench_svd(&mut c);
    c.final_summary();
    print_ratios(&dir, since);
}
