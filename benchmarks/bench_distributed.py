"""Two processes against one on the same CPU cores, in one run: what `torchrun` buys here.

Run: ``.venv/bin/python benchmarks/bench_distributed.py`` (``--cores 2``, the default, is
the number of threads of the one process and the number of processes of one thread each).
Every setup runs in spawned processes (gloo over loopback), timed from a barrier:

- ``formula``: the LE-MMSE (p = 5, float32, σ = 0.2) of ``--images`` FashionMNIST test
  images from ``--n-train`` training images, keys included: one process, and
  :func:`lemmse_core.distributed.le_mmse` on one shard per process (its difference to the
  one-process estimate is printed too);
- ``training``: ``--steps`` steps of the book's U-Net (p = 5, the quick profile's recipe):
  one process, and one independent run per process (what the experiment grid under
  ``torchrun`` does with its specs: the throughput is the sum); the patch MLP (no
  BatchNorm, which DDP on CPUs cannot synchronise) in one process and in one run with
  DistributedDataParallel over the processes (the same global batch).

Prints seconds and the speed-up over the one process with all the threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lemmse_core as lc
from lemmse_core import data, distributed, train
from lemmse_core import experiments as ex

SIGMA, P = 0.2, 5


def _formula(rank, world, mode, args):
    """The LE-MMSE of the test measurements from all the training images, or (``mode``
    ``"sharded"``) from this rank's shard of them, read alone."""
    sharded = mode == "sharded"
    shard = (rank, world) if sharded else None
    x = data.load("fashionmnist", n=args.n_train, shard=shard)
    test = data.load("fashionmnist", split="test", n=args.images).double()
    A = lc.operators.Denoising()
    y = A.measure(test, SIGMA, torch.Generator().manual_seed(0))
    return (distributed if sharded else lc).le_mmse(y, x, A, SIGMA, P)


def _config(net: str, args) -> train.TrainConfig:
    """The quick profile's recipe for the patch-size sweep's p = 5, with ``net``."""
    (spec,) = [s for s in ex.grid("quick", "patch_size") if s.patch_size == P]
    config = spec.train_config()
    warmup = min(config.warmup, args.steps - 1)
    return dataclasses.replace(config, net=net, steps=args.steps, warmup=warmup)


def _training(rank, world, mode, args):
    """``args.steps`` steps of ``mode`` = ``"net:how"``: one run (``how`` ``"one"``, or
    ``"ddp"`` over the ranks) or one run per rank (``"independent"``)."""
    net, how = mode.split(":")
    config = _config(net, args)
    if how == "independent":  # another run per process: another seed
        config = dataclasses.replace(config, seed=config.seed + rank)
    root = Path(args.root) / f"{net}-{how}-{world}"
    train.fit(config, device="cpu", root=root, distributed=how == "ddp")


def _worker(rank, world, port, threads, task, mode, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dist.barrier()
        start = time.perf_counter()
        result = (_formula if task == "formula" else _training)(rank, world, mode, args)
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(seconds, dist.ReduceOp.MAX)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save({"seconds": seconds.item(), "result": result}, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(task, mode, world, threads, args) -> dict:
    """Seconds (the slowest rank) and rank 0's result of ``task`` in ``world`` processes."""
    out = Path(args.root) / f"{task}-{mode}-{world}-{threads}.pt"
    run_args = (world, _free_port(), threads, task, mode, args, str(out))
    mp.start_processes(_worker, args=run_args, nprocs=world, join=True, start_method="spawn")
    return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    k = args.cores
    rows = []
    with tempfile.TemporaryDirectory() as root:
        args.root = root
        one = timed("formula", "one", 1, k, args)
        shards = timed("formula", "sharded", k, 1, args)
        diff = (one["result"] - shards["result"]).abs().max().item()
        rows += [
            (f"formula, N = {args.n_train}", f"1 process × {k} threads", one["seconds"], 1.0),
            ("", f"{k} shards × 1 thread", shards["seconds"], one["seconds"] / shards["seconds"]),
        ]
        base = timed("training", "unet:one", 1, k, args)["seconds"]
        apart = timed("training", "unet:independent", k, 1, args)["seconds"]
        mlp = timed("training", "patchmlp:one", 1, k, args)["seconds"]
        ddp = timed("training", "patchmlp:ddp", k, 1, args)["seconds"]
        rows += [
            (f"U-Net, {args.steps} steps", f"1 process × {k} threads", base, 1.0),
            ("", f"{k} runs × 1 thread (per run)", apart / k, base * k / apart),
            (f"patch MLP, {args.steps} steps", f"1 process × {k} threads", mlp, 1.0),
            ("", f"DDP, {k} ranks × 1 thread", ddp, mlp / ddp),
        ]
    print("| work | setup | seconds | speed-up |\n|---|---|---|---|")
    for work, setup, seconds, ratio in rows:
        print(f"| {work} | {setup} | {seconds:.1f} | {ratio:.2f} |")
    print(f"sharded formula against one process: max abs difference {diff:.1e}")


if __name__ == "__main__":
    main()
