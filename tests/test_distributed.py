"""The sharded estimators (lemmse_core.distributed) on 2 and 3 CPU (gloo) processes against
one process, for every operator and pre-inverse, in float32 and float64, on uneven splits
and empty shards; the LE-MMSE's diagnostics too, also with the same images in several
shards."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_estimators import CASES, P, problem

import lemmse_core as lc
from lemmse_core import distributed
from lemmse_core.lemmse import diagnostics

SIGMA = 0.3
#: Shard sizes of the 4 training images, per world size (uneven, and with empty shards).
SPLITS = {2: [(1, 3), (4, 0)], 3: [(2, 0, 2), (1, 1, 2)]}
#: Largest difference allowed against one process, per dtype (the order of the sums).
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float64)
#: Diagnostics of the sharded LE-MMSE: the mass and the number of heaviest terms.
MASS, TOP_K = 0.9, 3
#: Log-density and top weights against one process, relative: float32 per-term log-weights
#: carry the rounding of keys centred on each shard's mean, ~1e-7 of logits up to ~30.
DIAG_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def estimate(name, y, train, A, B, dtype, sharded):
    """The ``name`` estimate of ``train`` (its sharded version with ``sharded``)."""
    module = distributed if sharded else lc
    if name == "le_mmse":
        return module.le_mmse(y, train, A, SIGMA, P, B, dtype=dtype)
    return getattr(module, name)(y, train, A, SIGMA, B, dtype=dtype)


def diagnosed(y, train, A, B, dtype, sharded):
    """``(x_hat, PatchDiagnostics)`` of the LE-MMSE of ``train``, with mass counts."""
    module = distributed if sharded else lc
    kwargs = dict(dtype=dtype, diagnostics=True, mass=MASS, top_k=TOP_K)
    return module.le_mmse(y, train, A, SIGMA, P, B, **kwargs)


#: Caps of the mass-count histograms made too tight: the guess, then the certified cap too.
TIGHT = ("guess", "guess and cap")


@contextlib.contextmanager
def tight_caps(caps):
    """Guessed (and certified) caps of 0 bins: the counts are redone with the next cap."""
    saved = diagnostics._mass_guess, diagnostics._mass_cap

    def tight(views, rows, *args):
        return torch.zeros_like(rows)

    diagnostics._mass_guess = tight
    if caps == "guess and cap":
        diagnostics._mass_cap = tight
    try:
        yield
    finally:
        diagnostics._mass_guess, diagnostics._mass_cap = saved


def twice(op_name, kind):
    """The problem of ``op_name`` with its first two training images in place of the last
    two: every term has an identical one, in another shard for most splits."""
    train, A, B, y = problem(op_name, kind, "gray", SIGMA)
    return torch.cat([train[:2], train[:2]]), A, B, y


def check_diagnostics(got, want, dtype):
    """The sharded diagnostics are those of one process: log-density and top weights to
    ``DIAG_TOL``, strata and mass counts exactly, and the counts, global images and
    locations of every top term whose weight is clear of its neighbours'. Returns the
    largest difference of the log-densities."""
    (x, diag), (x_ref, ref) = got, want
    assert (x.double() - x_ref.double()).abs().max() < TOL[dtype]
    tol = dict(rtol=DIAG_TOL[dtype], atol=DIAG_TOL[dtype])
    torch.testing.assert_close(diag.log_density.double(), ref.log_density.double(), **tol)
    torch.testing.assert_close(diag.top_weights.double(), ref.top_weights.double(), **tol)
    assert torch.equal(diag.rank, ref.rank) and torch.equal(diag.mass_count, ref.mass_count)
    w = ref.top_weights.double()
    big = torch.full_like(w[..., :1], torch.inf)
    prev, nxt = torch.cat([big, w[..., :-1]], -1), torch.cat([w[..., 1:], -big], -1)
    margin = 1 + 100 * DIAG_TOL[dtype]
    clear = (w > 1e-12) & (prev > w * margin) & (w > nxt * margin)
    assert clear[..., 0].float().mean() > 0.9, "too many ties for the dominant source"
    assert torch.equal(diag.top_count[clear], ref.top_count[clear])
    assert torch.equal(diag.top_image[clear], ref.top_image[clear])
    assert torch.equal(diag.top_location[clear], ref.top_location[clear])
    return (diag.log_density.double() - ref.log_density.double()).abs().max().item()


def shard(train, sizes, rank):
    start = sum(sizes[:rank])
    return train[start : start + sizes[rank]]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for sizes in SPLITS[world]:
            for op_name, kind in CASES:
                train, A, B, y = problem(op_name, kind, "gray", SIGMA)
                for name in ("mmse", "e_mmse", "le_mmse"):
                    for dtype in DTYPES:
                        part = shard(train.to(dtype), sizes, rank)
                        value = estimate(name, y, part, A, B, dtype, sharded=True)
                        results[sizes, op_name, kind, name, dtype] = value
                for dtype in DTYPES:
                    diag = diagnosed(y, shard(train.to(dtype), sizes, rank), A, B, dtype, True)
                    results[sizes, op_name, kind, "diagnostics", dtype] = diag
            train, A, B, y = twice("denoising", "identity")
            for dtype in DTYPES:
                diag = diagnosed(y, shard(train.to(dtype), sizes, rank), A, B, dtype, True)
                results[sizes, "twice", "identity", "diagnostics", dtype] = diag
            for caps in TIGHT:  # the fallbacks of the mass counts, reduced over the ranks
                with tight_caps(caps):
                    diag = diagnosed(y, shard(train, sizes, rank), A, B, torch.float64, True)
                results[sizes, "twice", caps, "diagnostics", torch.float64] = diag
        train, A, B, y = problem("denoising", "identity", "gray", SIGMA)
        try:  # a bad σ on the non-empty shards: every rank raises, none waits
            distributed.mmse(y, shard(train, SPLITS[world][0], rank), A, -1.0, B)
        except (ValueError, RuntimeError) as exc:
            results["error"] = type(exc).__name__
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}.{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)  # a rank waiting forever fails instead of hanging
@pytest.mark.parametrize("world", sorted(SPLITS))
def test_sharded_estimators_equal_one_process(tmp_path, world):
    out = str(tmp_path / "result")
    mp.start_processes(
        _worker, args=(world, free_port(), out), nprocs=world, join=True, start_method="spawn"
    )
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]
    sizes = SPLITS[world][0]
    assert [r.pop("error", None) for r in ranks] == [
        "ValueError" if size else "RuntimeError" for size in sizes
    ]
    worst, worst_density = dict.fromkeys(DTYPES, 0.0), dict.fromkeys(DTYPES, 0.0)
    for key, value in ranks[0].items():
        _, op_name, kind, name, dtype = key
        if name == "diagnostics":
            if op_name == "twice":  # the tight caps: against the plain one-process count
                train, A, B, y = twice("denoising", "identity")
            else:
                train, A, B, y = problem(op_name, kind, "gray", SIGMA)
            want = diagnosed(y, train.to(dtype), A, B, dtype, False)
            error = check_diagnostics(value, want, dtype)
            worst_density[dtype] = max(worst_density[dtype], error)
            for other in ranks[1:]:
                assert torch.equal(other[key][1].top_image, value[1].top_image)
                assert torch.equal(other[key][1].mass_count, value[1].mass_count)
            continue
        train, A, B, y = problem(op_name, kind, "gray", SIGMA)
        single = estimate(name, y, train.to(dtype), A, B, dtype, sharded=False)
        assert value.dtype == dtype and value.shape == single.shape
        error = (value.double() - single.double()).abs().max().item()
        assert error < TOL[dtype], key
        worst[dtype] = max(worst[dtype], error)
        for other in ranks[1:]:
            assert torch.equal(other[key], value)  # every rank gets the same estimate
    print(f"world {world}: largest differences {worst}, of log-densities {worst_density}")


def test_needs_a_process_group():
    train, A, B, y = problem("denoising", "identity", "gray", SIGMA)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.mmse(y, train, A, SIGMA, B)
