"""The experiment grid over 2 CPU (gloo) ranks, as under torchrun, against one process."""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from test_data import needs
from test_experiments import tiny

from lemmse_core.experiments import distribute

#: Three specs: the first two share the formula's cache (same data, task and p), the
#: third shares nothing with them.
SPECS = [tiny(), tiny(arch="patchmlp"), tiny(patch_size=5)]


def write(path: str):
    def table(results) -> None:
        pd.concat([r.table for r in results], ignore_index=True).to_csv(path, index=False)

    return table


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    status = distribute.run_grid(SPECS, write(out), root=root, device="cpu", progress=False)
    assert status == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parts_keep_specs_that_share_files_together():
    assert distribute.parts(SPECS) == [SPECS[:2], SPECS[2:]]
    assert distribute.parts(SPECS[::-1]) == [SPECS[1::-1], SPECS[2:]]  # largest first
    assert distribute.parts(SPECS[2:]) == [SPECS[2:]]


@needs("fashionmnist")
@pytest.mark.timeout(300)  # a rank waiting forever fails instead of hanging
def test_two_ranks_write_the_single_process_table(tmp_path, monkeypatch):
    out = str(tmp_path / "two.csv")
    args = (2, free_port(), str(tmp_path / "two"), out)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single, threads = tmp_path / "one.csv", torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same order of floating-point sums
    try:
        distribute.run_grid(
            SPECS, write(str(single)), root=tmp_path / "one", device="cpu", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(single))
    assert len(pd.read_csv(single)) == 3 * 2 * 2 * 2  # specs × splits × σ × images
