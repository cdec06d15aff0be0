"""Speed and accuracy of the LE-MMSE and E-MMSE engines against a straightforward baseline.

Run: ``.venv/bin/python benchmarks/bench_estimators.py`` (all workloads) or with
``--workloads W1,W4``. Each workload runs in its own subprocess so that its peak memory
(``ru_maxrss``) is its own. Prints one table; numbers are measured in this run only.

Columns: seconds per image for the engine and for the baseline (plain float32: per key
chunk ``torch.cdist(...)**2`` then a streaming log-sum-exp), the speedup, the max abs
error of the engine (float32) against the float64 engine, key pairs per second, the ratio
to a roofline ``pairs × (2(d+1)/F + 1/E)`` measured in the same run (``F`` fp32 GFLOP/s
of a 2048² matmul, ``E`` exp/s of ``torch.exp`` on a cache-resident buffer, ``d`` the
patch dimension; above 1 means exact savings beat the roofline), and the peak memory
(resident set) of the engine: data, keys and one pass, before the baseline and the
float64 reference run in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

import lemmse_core as lc
from lemmse_core.patches import extract_patches

WORKLOADS = {
    "W1": dict(data="fashionmnist", n=500, op="denoising", B="identity"),
    "W2": dict(data="fashionmnist", n=5000, op="denoising", B="identity"),
    "W3": dict(data="cifar10", n=1000, op="denoising", B="identity"),
    "W4": dict(data="fashionmnist", n=500, op="blur", B="pinv"),
    "W5": dict(data="fashionmnist", n=500, op="inpainting", B="adjoint"),
    "W6": dict(data="fashionmnist", n=5000, op="denoising", B="identity", estimator="e_mmse"),
    "W7": dict(data="fashionmnist", n=10000, op="denoising", B="identity"),
}
PATCH, SIGMA, N_TEST = 5, 0.2, 8


def problem(spec):
    train = lc.data.load(spec["data"], n=spec["n"])
    test = lc.data.load(spec["data"], split="test", n=N_TEST)
    shape = tuple(train.shape[1:])
    A = {
        "denoising": lambda: lc.Denoising(),
        "blur": lambda: lc.Blur.gaussian(1.0),
        "inpainting": lambda: lc.Inpainting.center(shape, box=15),
    }[spec["op"]]()
    B = lc.preinverse(A, spec["B"])
    return train, test, A, B


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


# ---------------------------------------------------------------------------- baselines


def baseline_le_mmse(engine, y, sigma, chunk=16384):
    """Plain float32 LE-MMSE over every (location, image) term: cdist² + streaming LSE."""
    n, (c, h, w) = y.shape[0], engine.shape
    u = extract_patches(engine.B.A(y.double()), engine.p).reshape(n * h * w, -1)
    stratum, active = engine._active(u)
    state_max = torch.full((len(u),), -torch.inf)
    state_sum = torch.zeros(len(u))
    acc = torch.zeros(len(u), c)
    for i, cls in enumerate(engine.classes):
        rows = torch.nonzero(active[:, i]).flatten()
        if len(rows) == 0:
            continue
        q = (u[rows] @ cls.whiten.T - cls.centre).float()
        keys = cls.keys.repeat_interleave(cls.counts.long(), dim=0)  # every term, unmerged
        values = cls.values.repeat_interleave(cls.counts.long(), dim=0)
        bias = -0.5 * cls.log_pdet
        for k0 in range(0, len(keys), chunk):
            logits = -(torch.cdist(q, keys[k0 : k0 + chunk]) ** 2) / (2 * sigma**2) + bias
            new = torch.maximum(state_max[rows], logits.max(dim=1).values)
            scale = torch.exp(state_max[rows] - new)
            p = torch.exp(logits - new[:, None])
            acc[rows] = acc[rows] * scale[:, None] + p @ values[k0 : k0 + chunk]
            state_sum[rows] = state_sum[rows] * scale + p.sum(dim=1)
            state_max[rows] = new
    return (acc / state_sum[:, None]).reshape(n, h, w, c).permute(0, 3, 1, 2)


def baseline_e_mmse(y, train, sigma):
    """Plain float32 E-MMSE (B = I): every shift, cdist² to all images, streaming LSE."""
    n, (h, w) = y.shape[0], y.shape[-2:]
    flat_train = train.flatten(1)
    out = torch.zeros_like(y)
    for i in range(n):
        m, s, acc = -torch.inf, torch.tensor(0.0), torch.zeros_like(y[0])
        for gi in range(h):
            for gj in range(w):
                back = torch.roll(y[i], shifts=(-gi, -gj), dims=(-2, -1)).flatten()[None]
                logits = -(torch.cdist(back, flat_train)[0] ** 2) / (2 * sigma**2)
                new = max(m, logits.max().item())
                p = torch.exp(logits - new)
                avg = (p @ flat_train).reshape(y.shape[1:])
                acc = acc * math.exp(m - new) + torch.roll(avg, shifts=(gi, gj), dims=(-2, -1))
                s, m = s * math.exp(m - new) + p.sum(), new
        out[i] = acc / s
    return out


# ------------------------------------------------------------------------------ workload


def roofline():
    a = torch.randn(2048, 2048)
    a @ a
    flops, _ = best_of(lambda: a @ a, 3)
    buf = torch.randn(2**15)
    exps, _ = best_of(lambda: [torch.exp(buf) for _ in range(200)], 3)
    return 2 * 2048**3 / flops, 200 * buf.numel() / exps


def run_workload(name, repeat):
    spec = WORKLOADS[name]
    torch.manual_seed(0)
    train, test, A, B = problem(spec)
    y = A.measure(test, SIGMA, generator=torch.Generator().manual_seed(0))
    n_img, (c, h, w) = y.shape[0], train.shape[1:]
    row = {"workload": name, **spec}
    row["flops"], row["exps"] = roofline()
    if spec.get("estimator") == "e_mmse":
        t, out = best_of(lambda: lc.e_mmse(y, train, A, SIGMA), repeat)
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ref = lc.e_mmse(y, train, A, SIGMA, dtype=torch.float64)
        t_base, _ = best_of(lambda: baseline_e_mmse(y[:1], train, SIGMA), 1)
        row.update(engine_s=t / n_img, baseline_s=t_base, precompute_s=0.0)
        row.update(pairs=h * w * len(train) * h * w, d=c * h * w)
    else:
        t_pre, engine = best_of(lambda: lc.LEMMSE(train, A, PATCH, B), 1)
        t, out = best_of(lambda: engine(y, SIGMA), repeat)
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t_base, _ = best_of(lambda: baseline_le_mmse(engine, y[:2], SIGMA), 1)
        row.update(engine_s=t / n_img, baseline_s=t_base / 2, precompute_s=t_pre)
        row.update(pairs=h * w * len(train) * h * w, d=c * PATCH**2)
        row["distinct_keys"] = sum(len(cls.keys) for cls in engine.classes)
        row["classes"] = len(engine.classes)
        row["terms"] = len(train) * h * w
        reference = lc.LEMMSE(train, A, PATCH, B, dtype=torch.float64)
        ref = reference(y, SIGMA)
        if name == "W1":
            for s in (0.01, 0.1, 1.0):
                ys = A.measure(test, s, generator=torch.Generator().manual_seed(1))
                error = engine(ys, s).double() - reference(ys, s)
                row[f"err_sigma_{s}"] = error.abs().max().item()
    row["max_err"] = (out.double() - ref).abs().max().item()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_workload(args.one, args.repeat)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; F and E measured")
    print("in each workload's process just before it (second table)")
    header = (
        "| workload | engine s/img | baseline s/img | speedup | max err vs f64 | "
        "Mpairs/s | roofline ratio | peak MiB |"
    )
    print(header)
    print("|" + "---|" * 8)
    rows = []
    for name in args.workloads.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--repeat", str(args.repeat)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"| {name} | failed: {result.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        flops, exps = row["flops"], row["exps"]
        ideal = row["pairs"] * (2 * (row["d"] + 1) / flops + 1 / exps)
        ratio = f"{ideal / row['engine_s']:.2f}" if "classes" in row else "n/a (FFT)"
        print(
            f"| {name} | {row['engine_s']:.3f} | {row['baseline_s']:.3f} | "
            f"{row['baseline_s'] / row['engine_s']:.1f}× | {row['max_err']:.1e} | "
            f"{row['pairs'] / row['engine_s'] / 1e6:.0f} | {ratio} | {row['peak_mib']:.0f} |"
        )
    print(
        "\n| workload | F GFLOP/s | E G exp/s | precompute s | classes | distinct keys / terms "
        "| float32 error by σ |"
    )
    print("|" + "---|" * 7)
    for row in rows:
        if "classes" not in row:
            continue
        errors = ", ".join(f"σ={k[10:]}: {v:.1e}" for k, v in row.items() if k.startswith("err_"))
        print(
            f"| {row['workload']} | {row['flops'] / 1e9:.0f} | {row['exps'] / 1e9:.2f} | "
            f"{row['precompute_s']:.2f} | {row['classes']} | "
            f"{row['distinct_keys'] / row['terms']:.2f} | {errors or '-'} |"
        )


if __name__ == "__main__":
    main()
