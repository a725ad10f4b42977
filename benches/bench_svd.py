"""Benchmark: top-r SVD for adapter initialisation, innerpissa (Rust/faer) vs torch.

    python benches/bench_svd.py [--threads 2] [--reps 3] [--ranks 64 144]

Weights are random float32 Gaussians (std 0.02) with the real SmolLM2-135M
linear shapes (hidden 576, intermediate 1536, 9 query / 3 kv heads of dim 64):
q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536. No model is loaded.
Random matrices have a flat spectrum, the hardest case for randomized SVD;
trained weights decay faster, which helps svd_lowrank's accuracy but barely
changes the cost of the exact methods.

Two workloads:
  * "o+down x20": o_proj and down_proj of 20 layers (40 matrices), the
    matrices the adapter targets;
  * "layer x7":  one decoder layer's 7 linear weights.

Methods (all return U (d_out,r), S (r,), V (d_in,r) in float32):
  * innerpissa f64 / f32: innerpissa.svd.top_r_svd (batched, rayon over
    matrices; precision="float64" is the default);
  * torch.linalg.svd: full_matrices=False, then truncated to r;
  * torch.svd_lowrank: randomized, q = r + 10 with niter=2, and q = 2r with niter=4.

Timing: wall clock, median of --reps runs after one warm-up call per method,
torch and rayon both limited to --threads threads. Ratios are time / time of
torch.linalg.svd measured in the same run (< 1 means faster).

Accuracy, against the exact truncated SVD computed in float64
(torch.linalg.svd of the float64 weight), worst case over the workload's matrices:
  * sv: max_j |s_j - s*_j| / s*_j over the top r;
  * recon: (‖W - U S Vᵀ‖_F - ‖W - W*_r‖_F) / ‖W - W*_r‖_F, the excess over the
    Eckart–Young optimum (0 for an exact method, up to rounding).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 144])
    ap.add_argument("--layers", type=int, default=20, help="layers in the o+down workload")
    args = ap.parse_args()

    # rayon reads RAYON_NUM_THREADS when its pool is first used.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import torch

    from innerpissa.svd import top_r_svd

    torch.set_num_threads(args.threads)

    hidden, inter, kv = 576, 1536, 3 * 64
    layer = {
        "q": (hidden, hidden),
        "k": (kv, hidden),
        "v": (kv, hidden),
        "o": (hidden, hidden),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    g = torch.Generator().manual_seed(0)

    def weights(shapes):
        return [0.02 * torch.randn(*s, generator=g) for s in shapes]

    workloads = {
        f"o+down x{args.layers}": weights([layer["o"], layer["down"]] * args.layers),
        "layer x7": weights(list(layer.values())),
    }

    def torch_exact(ws, r):
        out = []
        for w in ws:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            out.append((u[:, :r], s[:r], vh[:r].T))
        return out

    def torch_lowrank(q_of, niter):
        def run(ws, r):
            out = []
            for w in ws:
                u, s, v = torch.svd_lowrank(w, q=q_of(r), niter=niter)
                out.append((u[:, :r], s[:r], v[:, :r]))
            return out

        return run

    methods = {
        "innerpissa f64 (default)": lambda ws, r: top_r_svd(ws, r),
        "innerpissa f32": lambda ws, r: top_r_svd(ws, r, precision="float32"),
        "torch.linalg.svd": torch_exact,
        "torch.svd_lowrank q=r+10 it=2": torch_lowrank(lambda r: r + 10, 2),
        "torch.svd_lowrank q=2r it=4": torch_lowrank(lambda r: 2 * r, 4),
    }

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"threads: torch {torch.get_num_threads()}, RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}, "
        f"cpu: {_cpu()}, reps={args.reps}"
    )

    for name, ws in workloads.items():
        # Exact float64 reference, shared by every rank.
        ref = [torch.linalg.svd(w.double(), full_matrices=False) for w in ws]
        for r in args.ranks:
            if r > min(min(w.shape) for w in ws):
                print(f"\n[{name}, r={r}] skipped: r > min(shape) for some matrix")
                continue
            print(f"\n[{name}, r={r}] {len(ws)} matrices, float32")
            print(f"{'method':32s} {'median s':>9s} {'t/t_linalg':>11s} {'sv rel err':>11s} {'recon excess':>13s}")
            times = {}
            for label, fn in methods.items():
                fn(ws[:1], r)  # warm-up (thread pools, allocator)
                samples, out = [], None
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    out = fn(ws, r)
                    samples.append(time.perf_counter() - t0)
                times[label] = statistics.median(samples)
                sv, rec = _accuracy(ws, ref, out, r)
                times[label] = (times[label], sv, rec)
            base = times["torch.linalg.svd"][0]
            for label, (t, sv, rec) in times.items():
                print(f"{label:32s} {t:9.3f} {t / base:11.2f} {sv:11.1e} {rec:13.1e}")
            sys.stdout.flush()


def _accuracy(ws, ref, out, r):
    import torch

    sv_err, rec_err = 0.0, 0.0
    for w, (_u0, s0, _vh0), (u, s, v) in zip(ws, ref, out):
        w = w.double()
        s_ref = s0[:r]
        sv_err = max(sv_err, ((s.double() - s_ref).abs() / s_ref).max().item())
        best = s0[r:].square().sum().sqrt().item()  # Eckart–Young optimum
        got = torch.linalg.matrix_norm(w - (u.double() * s.double()) @ v.double().T).item()
        rec_err = max(rec_err, (got - best) / best)
    return sv_err, rec_err


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
