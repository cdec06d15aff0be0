"""Training: schedule, determinism, resumable and reusable run folders, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lemmse_core import train
from lemmse_core.train import TrainConfig

N, SIZE = 12, 8


def images(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, SIZE, SIZE, generator=gen)


def config(**kwargs) -> TrainConfig:
    values = {
        "net": "resnet",
        "n_train": N,
        "steps": 20,
        "batch_size": 4,
        "warmup": 2,
        "ema_decay": 0.9,
        "dataset": "synthetic",
    }
    return TrainConfig(**{**values, **kwargs})


def fit(cfg, root, **kwargs):
    return train.fit(
        cfg, images(), device="cpu", run_root=root, progress=False, checkpoint_every=10, **kwargs
    )


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Stop(Exception):
    pass


def stop_at(n: int, exc=Stop):
    def callback(step, loss):
        if step == n:
            raise exc

    return callback


def test_learning_rate_warms_up_then_decays_once_to_the_floor():
    cfg = config(steps=100, warmup=10, lr=1e-3, lr_floor=1e-5)
    lrs = [train.learning_rate(cfg, s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # one period
    assert lrs[-1] == pytest.approx(1e-5)
    assert train.learning_rate(cfg, cfg.steps) == pytest.approx(1e-5)


def test_batches_cover_every_image_once_per_epoch():
    cfg = config(batch_size=5)
    seen = torch.cat([train._batch_indices(cfg, s, N) for s in range(12)])  # 5 epochs
    for epoch in range(5):
        assert sorted(seen[epoch * N : (epoch + 1) * N].tolist()) == list(range(N))
    assert not torch.equal(seen[:N], seen[N : 2 * N])  # reshuffled


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = config()
    reference = fit(cfg, tmp_path / "a")
    with pytest.raises(Stop):
        fit(cfg, tmp_path / "b", callback=stop_at(15))
    folder = train.run_dir(cfg, images(), tmp_path / "b")
    assert not (folder / train.DONE).exists()
    assert train.load_checkpoint(folder / train.CHECKPOINT)["step"] == 10
    resumed = fit(cfg, tmp_path / "b")
    assert not resumed.loaded
    assert_same_state(resumed.model, reference.model)
    assert_same_state(resumed.ema_model, reference.ema_model)
    assert resumed.history == reference.history and len(resumed.history) == 20


def test_keyboard_interrupt_leaves_the_last_checkpoint_intact(tmp_path):
    cfg = config()
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path, callback=stop_at(14, KeyboardInterrupt))
    folder = train.run_dir(cfg, images(), tmp_path)
    state = train.load_checkpoint(folder / train.CHECKPOINT)  # weights_only=True
    assert state["step"] == 10 and len(state["history"]) == 10
    assert state["config"] == cfg.to_dict()
    assert sorted(p.name for p in folder.iterdir()) == [train.CHECKPOINT, train.CONFIG]


def test_finished_run_is_loaded_instead_of_retrained(tmp_path):
    cfg = config(steps=10)
    first = fit(cfg, tmp_path)
    assert not first.loaded and (first.path / train.DONE).exists()

    def fail(step, loss):
        raise AssertionError("retrained")

    second = fit(cfg, tmp_path, callback=fail)
    assert second.loaded and second.path == first.path
    assert_same_state(second.ema_model, first.ema_model)
    assert second.history == first.history and second.seconds == pytest.approx(first.seconds)
    assert not second.ema_model.training and not second.model.training
    saved = json.loads((first.path / train.CONFIG).read_text())
    assert saved["config"] == cfg.to_dict() and saved["data"] == train.fingerprint(images())


def test_run_folder_is_keyed_by_config_and_data(tmp_path):
    base = train.run_dir(config(), images(), tmp_path)
    assert base == train.run_dir(config(), images(), tmp_path)
    assert base.parent == tmp_path and len(base.name) == 12
    assert base != train.run_dir(config(seed=1), images(), tmp_path)
    assert base != train.run_dir(config(), images(seed=1), tmp_path)


def test_run_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LEMMSE_RUNS", str(tmp_path))
    assert train.run_root() == tmp_path
    monkeypatch.delenv("LEMMSE_RUNS")
    assert train.run_root().name == "runs"


def test_training_lowers_the_error_and_the_ema_lags(tmp_path):
    gen = torch.Generator().manual_seed(0)
    binary = (torch.rand(N, 1, SIZE, SIZE, generator=gen) > 0.5).float()
    noisy = binary + 0.5 * torch.randn(binary.shape, generator=gen)
    cfg = config(steps=40, lr=3e-3, ema_decay=0.95)
    run = train.fit(cfg, binary, device="cpu", run_root=tmp_path, progress=False)
    initial = train._build(cfg, "cpu").eval()
    with torch.no_grad():
        before = torch.mean((initial(noisy, 0.5) - binary) ** 2).item()
        after = torch.mean((run.ema_model(noisy, 0.5) - binary) ** 2).item()
    assert after < 0.85 * before, (before, after)  # measured: ratio 0.69
    differs = [
        not torch.equal(e, m)
        for e, m in zip(run.ema_model.parameters(), run.model.parameters(), strict=True)
    ]
    assert all(differs)
    assert math.isfinite(run.seconds) and run.steps_per_second > 0


@pytest.mark.parametrize(
    ("operator", "preinverse", "lam"),
    [
        ("inpainting_center:4", "adjoint", None),
        ("blur_gaussian:1.0", "tikhonov", 0.1),
        ("blur_gaussian:1.0", "pinv", None),
    ],
)
def test_other_operators(tmp_path, operator, preinverse, lam):
    cfg = config(net="unet", steps=3, warmup=0, operator=operator, preinverse=preinverse, lam=lam)
    A, B = train.build_operators(cfg, (1, SIZE, SIZE))
    assert type(A).__name__ in ("Inpainting", "Blur")
    run = fit(cfg, tmp_path)
    assert len(run.history) == 3 and all(math.isfinite(v) for v in run.history)
    # The networks' preconditioning knows the noise level of v = B y, stored with the run.
    gain = B.noise_gain((1, SIZE, SIZE))
    assert gain != 1 and run.ema_model.noise_gain.item() == pytest.approx(gain, rel=1e-6)
    assert fit(cfg, tmp_path).ema_model.noise_gain.item() == pytest.approx(gain, rel=1e-6)


def test_bad_configs():
    with pytest.raises(ValueError, match="operator"):
        config(operator="inpainting")
    with pytest.raises(ValueError, match="name"):
        config(net="vit")
    with pytest.raises(ValueError, match="steps"):
        config(steps=0)
    with pytest.raises(ValueError, match="train_images"):
        train.fit(config(), torch.rand(3, 1, SIZE, SIZE), device="cpu", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(tmp_path):
    run = train.fit(config(steps=4), images(), device="cuda", run_root=tmp_path, progress=False)
    assert next(run.ema_model.parameters()).is_cuda
