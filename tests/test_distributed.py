"""The sharded estimators (lemmse_core.distributed) on 2 and 3 CPU (gloo) processes against
one process, for every operator and pre-inverse, in float32 and float64, on uneven splits
and empty shards."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_estimators import CASES, P, problem

import lemmse_core as lc
from lemmse_core import distributed

SIGMA = 0.3
#: Shard sizes of the 4 training images, per world size (uneven, and with empty shards).
SPLITS = {2: [(1, 3), (4, 0)], 3: [(2, 0, 2), (1, 1, 2)]}
#: Largest difference allowed against one process, per dtype (the order of the sums).
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = (torch.float32, torch.float64)


def estimate(name, y, train, A, B, dtype, sharded):
    """The ``name`` estimate of ``train`` (its sharded version with ``sharded``)."""
    module = distributed if sharded else lc
    if name == "le_mmse":
        return module.le_mmse(y, train, A, SIGMA, P, B, dtype=dtype)
    return getattr(module, name)(y, train, A, SIGMA, B, dtype=dtype)


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
    worst = dict.fromkeys(DTYPES, 0.0)
    for key, value in ranks[0].items():
        _, op_name, kind, name, dtype = key
        train, A, B, y = problem(op_name, kind, "gray", SIGMA)
        single = estimate(name, y, train.to(dtype), A, B, dtype, sharded=False)
        assert value.dtype == dtype and value.shape == single.shape
        error = (value.double() - single.double()).abs().max().item()
        assert error < TOL[dtype], key
        worst[dtype] = max(worst[dtype], error)
        for other in ranks[1:]:
            assert torch.equal(other[key], value)  # every rank gets the same estimate
    print(f"world {world}: largest differences {worst}")


def test_needs_a_process_group():
    train, A, B, y = problem("denoising", "identity", "gray", SIGMA)
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.mmse(y, train, A, SIGMA, B)
