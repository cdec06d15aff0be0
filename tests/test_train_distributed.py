"""Training with DistributedDataParallel: 2 CPU (gloo) processes against one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lemmse_core import train
from lemmse_core.train import TrainConfig

N, SIZE, STEPS = 12, 8, 8
#: Largest parameter difference allowed against one process (measured: see train._ranks).
ATOL = 1e-5


def images() -> torch.Tensor:
    return torch.rand(N, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def config(**changes) -> TrainConfig:
    values = {
        "net": "patchmlp",
        "patch_size": 3,
        "n_train": N,
        "steps": STEPS,
        "batch_size": 4,
        "warmup": 2,
        "ema_decay": 0.9,
        "dataset": "synthetic",
    }
    return TrainConfig(**{**values, **changes})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run = train.fit(
            cfg,
            images(),
            device="cpu",
            root=root,
            progress=False,
            distributed=True,
            checkpoint_every=3,
        )
        torch.save(
            {
                "model": run.model.state_dict(),
                "ema": run.ema_model.state_dict(),
                "history": run.history,
                "path": str(run.path),
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def fit_on_two_ranks(tmp_path, cfg: TrainConfig) -> list[dict]:
    out = str(tmp_path / "state")
    args = (2, free_port(), str(tmp_path / "ddp"), cfg, out)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.timeout(300)  # a rank waiting forever fails instead of hanging
def test_ddp_matches_one_process_and_uses_its_run_folder(tmp_path):
    cfg = config()
    single = train.fit(cfg, images(), device="cpu", root=tmp_path / "one", progress=False)
    states = fit_on_two_ranks(tmp_path, cfg)
    for state in states:
        assert max_difference(state["model"], single.model.state_dict()) < ATOL
        assert max_difference(state["ema"], single.ema_model.state_dict()) < ATOL
        assert state["history"] == pytest.approx(single.history, rel=1e-5)
        assert max_difference(state["model"], states[0]["model"]) == 0  # ranks agree exactly
    folder = train.run_dir(cfg, images(), tmp_path / "ddp")
    assert states[0]["path"] == str(folder)
    assert folder.name == single.path.name  # the same config hash as one process
    assert (folder / train.DONE).exists()
    again = train.fit(cfg, images(), device="cpu", root=tmp_path / "ddp", progress=False)
    assert again.loaded and again.history == states[0]["history"]


def test_distributed_needs_a_process_group_and_a_divisible_batch(tmp_path):
    with pytest.raises(RuntimeError, match="init_process_group"):
        train.fit(config(), images(), device="cpu", root=tmp_path, distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        train.fit(config(), images(), device="cpu", root=tmp_path, distributed="yes")
