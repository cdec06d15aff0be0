"""The experiment grid over the ranks of ``torchrun``: each rank trains and evaluates its
share of the specs on its own device, then rank 0 gathers the table.

Specs that share a network run or a formula cache file form one *part* (connected
components of that relation), so no two processes ever write the same file. The ranks
claim the parts, largest first, from a counter in the process group's store (the
``torchrun`` rendezvous): a rank that finishes early takes the next part, so the ranks
stay busy whatever each part costs. Every run stays resumable, and the table is the one
a single process writes (it is read back from the caches).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import train
from .engine import Result, _keys, _load_images, run_one
from .spec import Spec

#: How long a rank waits for the others (training a paper-scale share takes hours).
TIMEOUT = datetime.timedelta(days=7)
_COUNTER = "lemmse/grid/claimed"  # the store's key of the parts claimed so far


def parts(specs: list[Spec]) -> list[list[Spec]]:
    """A partition of ``specs`` in which specs sharing a run folder or a formula cache are
    in the same part: the largest parts first, grid order within each and among equals."""
    parent = list(range(len(specs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, spec in enumerate(specs):
        for key in _files(spec):
            parent[root(i)] = root(owner.setdefault(key, i))
    components: dict[int, list[int]] = {}
    for i in range(len(specs)):
        components.setdefault(root(i), []).append(i)
    ordered = sorted(components.values(), key=lambda m: (-len(m), m[0]))
    return [[specs[i] for i in members] for members in ordered]


def _files(spec: Spec) -> list[str]:
    """The files a spec writes: its run folder and its formula caches (one per split)."""
    train_images, eval_images = _load_images(spec)
    folder = train.run_dir(spec.train_config(), train_images).name
    return [
        f"run/{folder}",
        *(f"formula/{k}" for k in _keys(spec, train_images, eval_images).values()),
    ]


def run_grid(
    specs: list[Spec],
    write_table: Callable[[list[Result]], None],
    *,
    root=None,
    device=None,
    progress: bool | None = None,
) -> int:
    """Run ``specs`` in this process, or its share of them under ``torchrun``
    (``WORLD_SIZE`` > 1: gloo on CPUs, NCCL on GPUs, one device per local rank), then call
    ``write_table`` with every spec's result (on rank 0 only); the exit status."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        write_table(_run_specs(specs, root, device, progress, ""))
        return 0
    device = _init(device)
    rank, error = dist.get_rank(), None
    try:
        todo = parts(specs)
        for i in _claims(len(todo)):
            _run_specs(todo[i], root, device, progress, f"rank {rank}, part {i + 1}/{len(todo)}: ")
    except Exception as exc:  # the other ranks must not wait for this one forever
        error = exc
    failed = torch.tensor([float(error is not None)], device=device)
    dist.all_reduce(failed)
    try:
        if error is not None:
            raise error
        if failed.item():
            print(f"rank {rank}: another rank failed; the table is not written", flush=True)
            return 1
        if rank == 0:
            results = [run_one(s, root=root, finished_only=True) for s in specs]
            if None in results:
                raise RuntimeError("a spec is not finished after every rank ran its share")
            write_table(results)
        return 0
    finally:
        dist.destroy_process_group()


def _claims(n: int):
    """The indices in ``range(n)`` that this rank claims, one at a time, from a counter in
    the default process group's store that every rank increments (reset by rank 0 first)."""
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store of the group
    if dist.get_rank() == 0:
        store.delete_key(_COUNTER)
    dist.barrier()
    while (i := store.add(_COUNTER, 1) - 1) < n:
        yield i


def _init(device):
    """Initialise the default process group from torchrun's variables; this rank's device."""
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda and device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device(device) if device is not None else torch.device("cpu")


def _run_specs(specs, root, device, progress, prefix: str) -> list[Result]:
    results = []
    for i, spec in enumerate(specs, 1):
        print(f"{prefix}[{i}/{len(specs)}] {spec.name}", flush=True)
        result = run_one(spec, root=root, device=device, progress=progress)
        print(f"{prefix}  {result.summary}", flush=True)
        results.append(result)
    return results
