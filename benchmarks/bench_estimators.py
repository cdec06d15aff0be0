"""Speed and accuracy of the LE-MMSE and E-MMSE engines against a straightforward baseline,
KeOps and a roofline, measured side by side in one run.

Run: ``.venv/bin/python benchmarks/bench_estimators.py`` (W1–W6) or with ``--workloads
W1,W4 --sigma 0.05 --rtol 0,1e-6 --images 8 --json out.json``. Each workload runs in its
own subprocess so that its peak memory (``ru_maxrss``) is its own.

Per workload and ``rtol``: seconds per image of the engine, of the baseline (plain float32:
per key chunk ``torch.cdist(...)**2`` then a streaming log-sum-exp over every term) and
of KeOps (``pykeops``, ``sumsoftmaxweight`` on LazyTensors over the merged keys, CPU; W1
and W3 only; optional: the row says why when it cannot run), the max abs error against
the float64 engine (rtol = 0, itself tested against brute-force definitions), the largest
error bound the pruned engine guarantees, the roofline ``pairs × (2(d+1)/F + 1/E)`` and
its ratio to each time (``F``: fp32 FLOP/s of a 2048² matmul, ``E``: exp/s of
``torch.exp`` on a cache-resident buffer, both best of 5 in the same process just before
the workload; above 1 means exact savings beat the roofline), the precomputation time and
the peak memory of the engine (data, keys, one pass).

Diagnostics (``--diag-workloads``, W1 by default): seconds per image of
``engine(y, σ, diagnostics=True, mass=0.9)`` with ``top_k=1`` and with the default
``top_k``, and their ratios to the plain engine, all three timed alternately in one loop
(best of ``--repeat`` each) so that the ratios see the same machine load.
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
PATCH = 5
KEOPS_WORKLOADS = ("W1", "W3")
DIAG_MASS = 0.9  # the mass of the timed diagnostics (PatchDiagnostics.mass_count)
ERROR_SIGMAS = (0.01, 0.05, 0.2, 1.0)  # float32 error by σ (W1, W3, W4), on 2 images


def problem(spec, n_test=8):
    train = lc.data.load(spec["data"], n=spec["n"])
    test = lc.data.load(spec["data"], split="test", n=n_test)
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
    stratum, active = engine.store.active(u)
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


def roofline(repeat=5):
    """``(F, E)``: best-of-``repeat`` fp32 FLOP/s of a 2048² matmul and exp/s of torch.exp."""
    a = torch.randn(2048, 2048)
    a @ a
    flops, _ = best_of(lambda: a @ a, repeat)
    buf, out = torch.randn(2**16), torch.empty(2**16)
    exps, _ = best_of(lambda: [torch.exp(buf, out=out) for _ in range(200)], repeat)
    return 2 * 2048**3 / flops, 200 * buf.numel() / exps


def keops_le_mmse(engine, y, sigma):
    """LE-MMSE with KeOps (B = I: one class): softmax over the merged keys, with log counts."""
    from pykeops.torch import LazyTensor

    (cls,) = engine.classes
    n, (c, h, w) = y.shape[0], engine.shape
    u = extract_patches(engine.B.A(y.double()), engine.p).reshape(n * h * w, -1)
    q = (u @ cls.whiten.T - cls.centre).float()
    keys, log_counts = [], []
    for (k0, k1), mean in zip(cls.bounds, cls.means, strict=True):
        keys.append((cls.keys[k0:k1].double() + mean).float())
        log_counts.append(cls.counts[k0:k1].log().float())
    keys, log_counts = torch.cat(keys), torch.cat(log_counts)[:, None]
    qi, kj = LazyTensor(q[:, None, :]), LazyTensor(keys[None, :, :])
    logits = -((qi - kj) ** 2).sum(-1) / (2 * sigma**2) + LazyTensor(log_counts[None, :, :])
    out = logits.sumsoftmaxweight(LazyTensor(cls.values.contiguous()[None, :, :]), axis=1)
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


def time_keops(engine, y, sigma):
    """``(seconds per image, output)`` after one warm-up (compilation), or a reason string."""
    try:
        keops_le_mmse(engine, y[:1], sigma)
        t, out = best_of(lambda: keops_le_mmse(engine, y, sigma), 1)
    except Exception as error:  # an optional peer: say why instead of failing
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}", None
    return t / len(y), out


def time_diagnostics(engine, y, sigma, repeat):
    """Seconds per image: plain engine, diagnostics with ``top_k=1`` and default ``top_k``,
    timed alternately, best of ``repeat`` each; and the ratios to the plain engine."""
    runs = {
        "diag_plain_s": {},
        "diag_top1_s": dict(diagnostics=True, mass=DIAG_MASS, top_k=1),
        "diag_s": dict(diagnostics=True, mass=DIAG_MASS),
    }
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeat):
        for key, kwargs in runs.items():
            start = time.perf_counter()
            engine(y, sigma, **kwargs)
            best[key] = min(best[key], (time.perf_counter() - start) / len(y))
    best["diag_top1_ratio"] = best["diag_top1_s"] / best["diag_plain_s"]
    best["diag_ratio"] = best["diag_s"] / best["diag_plain_s"]
    return best


def run_workload(name, repeat, sigma, rtols, n_images, diag_workloads=("W1",)):
    spec = WORKLOADS[name]
    torch.manual_seed(0)
    train, test, A, B = problem(spec, n_images)
    y = A.measure(test, sigma, generator=torch.Generator().manual_seed(0))
    n_img, (c, h, w) = y.shape[0], train.shape[1:]
    common = {"workload": name, "sigma": sigma, **spec}
    common["flops"], common["exps"] = roofline()
    if spec.get("estimator") == "e_mmse":
        t, out = best_of(lambda: lc.e_mmse(y, train, A, sigma), repeat)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ref = lc.e_mmse(y, train, A, sigma, dtype=torch.float64)
        t_base, _ = best_of(lambda: baseline_e_mmse(y[:1], train, sigma), 1)
        common.update(baseline_s=t_base, precompute_s=0.0, pairs=h * w * len(train) * h * w)
        common.update(d=c * h * w, roofline_s=None)
        row = dict(common, rtol=0.0, engine_s=t / n_img, peak_mib=peak, bound=0.0)
        return [dict(row, max_err=(out.double() - ref).abs().max().item())]
    t_pre, engine = best_of(lambda: lc.LEMMSE(train, A, PATCH, B), 1)
    rows = []
    for rtol in rtols:
        t, (out, bound) = best_of(lambda r=rtol: engine(y, sigma, rtol=r, error_bound=True), repeat)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(dict(rtol=rtol, engine_s=t / n_img, peak_mib=peak, out=out))
        rows[-1]["bound"] = bound.max().item()
    pairs = h * w * len(train) * h * w
    common.update(pairs=pairs, d=c * PATCH**2, precompute_s=t_pre)
    common["roofline_s"] = pairs * (2 * (common["d"] + 1) / common["flops"] + 1 / common["exps"])
    common["distinct_keys"] = sum(len(cls.keys) for cls in engine.classes)
    common["classes"], common["terms"] = len(engine.classes), len(train) * h * w
    common["groups"] = sum(len(cls.bounds) for cls in engine.classes)
    t_base, _ = best_of(lambda: baseline_le_mmse(engine, y[:2], sigma), 1)
    common["baseline_s"] = t_base / 2
    reference = lc.LEMMSE(train, A, PATCH, B, dtype=torch.float64)
    ref = reference(y, sigma)
    if name in KEOPS_WORKLOADS:
        keops_s, keops_out = time_keops(engine, y[:1], sigma)
        common["keops_s"] = keops_s
        if keops_out is not None:
            common["keops_err"] = (keops_out.double() - ref[:1]).abs().max().item()
    if name in diag_workloads:
        common.update(time_diagnostics(engine, y, sigma, repeat))
    if name in ("W1", "W3", "W4"):
        for s in ERROR_SIGMAS:
            ys = A.measure(test[:2], s, generator=torch.Generator().manual_seed(1))
            common[f"err_sigma_{s}"] = (
                (engine(ys, s).double() - reference(ys, s)).abs().max().item()
            )
    for row in rows:
        row["max_err"] = (row.pop("out").double() - ref).abs().max().item()
        row.update(common)
        row["roofline_ratio"] = common["roofline_s"] / row["engine_s"]
    return rows


def _fmt(value, spec):
    return value if isinstance(value, str) else format(value, spec)


def print_tables(rows):
    print(
        "| workload | σ | rtol | engine s/img | baseline s/img | KeOps s/img | roofline s/img "
        "| baseline/engine | KeOps/engine | roofline/engine | max err vs f64 | bound | peak MiB |"
    )
    print("|" + "---|" * 13)
    for row in rows:
        e, keops, roof = row["engine_s"], row.get("keops_s", "-"), row["roofline_s"]
        timed = not isinstance(keops, str)
        cells = [
            row["workload"],
            row["sigma"],
            f"{row['rtol']:g}",
            f"{e:.3f}",
            f"{row['baseline_s']:.3f}",
            f"{keops:.3f}" if timed else keops,
            "n/a (FFT)" if roof is None else f"{roof:.3f}",
            f"{row['baseline_s'] / e:.1f}",
            f"{keops / e:.1f}" if timed else "-",
            "-" if roof is None else f"{roof / e:.2f}",
            f"{row['max_err']:.1e}",
            f"{row['bound']:.1e}",
            f"{row['peak_mib']:.0f}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(
        "\n| workload | F GFLOP/s | E G exp/s | precompute s | classes | groups | distinct keys "
        "/ terms | KeOps err | float32 error by σ |"
    )
    print("|" + "---|" * 9)
    for row in rows:
        if "classes" not in row or row["rtol"] != rows[0]["rtol"]:
            continue
        errors = ", ".join(f"σ={k[10:]}: {v:.1e}" for k, v in row.items() if k.startswith("err_"))
        print(
            f"| {row['workload']} | {row['flops'] / 1e9:.0f} | {row['exps'] / 1e9:.2f} | "
            f"{row['precompute_s']:.2f} | {row['classes']} | {row['groups']} | "
            f"{row['distinct_keys'] / row['terms']:.2f} | "
            f"{_fmt(row.get('keops_err', '-'), '.1e')} | {errors or '-'} |"
        )
    diag = [row for row in rows if "diag_s" in row and row["rtol"] == rows[0]["rtol"]]
    if diag:
        print(
            f"\n| workload | plain s/img | diagnostics s/img, mass={DIAG_MASS}, top_k=1 | ratio "
            "| diagnostics s/img, default top_k | ratio |"
        )
        print("|" + "---|" * 6)
    for row in diag:
        print(
            f"| {row['workload']} | {row['diag_plain_s']:.3f} | {row['diag_top1_s']:.3f} | "
            f"{row['diag_top1_ratio']:.2f} | {row['diag_s']:.3f} | {row['diag_ratio']:.2f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.2)
    parser.add_argument("--rtol", default="0", help="comma-separated pruning tolerances")
    parser.add_argument("--images", type=int, default=8, help="test images per workload")
    parser.add_argument("--json", help="write the rows (one object per workload and rtol)")
    parser.add_argument(
        "--diag-workloads", default="W1", help="LE-MMSE workloads timed with diagnostics"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rtols = [float(r) for r in args.rtol.split(",")]
    if args.one:
        diag = tuple(args.diag_workloads.split(","))
        rows = run_workload(args.one, args.repeat, args.sigma, rtols, args.images, diag)
        print(json.dumps(rows))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, σ = {args.sigma}, ")
    print(f"{args.images} images; F and E measured in each workload's process before it\n")
    rows = []
    for name in args.workloads.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--repeat", str(args.repeat)]
        cmd += ["--sigma", str(args.sigma), "--rtol", args.rtol, "--images", str(args.images)]
        cmd += ["--diag-workloads", args.diag_workloads]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"| {name} | failed: {result.stderr.strip().splitlines()[-1]} |")
            continue
        rows += json.loads(result.stdout.strip().splitlines()[-1])
    print_tables(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
