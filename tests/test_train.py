"""Training: schedule, determinism, resumable and reusable run folders, checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import zipfile

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
        cfg, images(), device="cpu", root=root, progress=False, checkpoint_every=10, **kwargs
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
    run = train.fit(cfg, binary, device="cpu", root=tmp_path, progress=False)
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
    with pytest.raises(ValueError, match="net"):
        config(net="vit")
    with pytest.raises(ValueError, match="steps"):
        config(steps=0)
    with pytest.raises(ValueError, match="train_images"):
        train.fit(config(), torch.rand(3, 1, SIZE, SIZE), device="cpu", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(tmp_path):
    run = train.fit(config(steps=4), images(), device="cuda", root=tmp_path, progress=False)
    assert next(run.ema_model.parameters()).is_cuda


# ------------------------------------------------------------------- nothing silent


def finished(tmp_path, **kwargs):
    cfg = config(steps=10, **kwargs)
    run = fit(cfg, tmp_path)
    return cfg, run.path / train.CHECKPOINT


def flip_tensor_byte(path) -> None:
    """Flip the lowest bit of one float inside the largest tensor of the file."""
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(entries, key=lambda i: i.file_size)
    data, header = bytearray(path.read_bytes()), info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    start = header + 30 + name_len + extra_len
    data[start + info.file_size // 8 * 4] ^= 1
    path.write_bytes(bytes(data))


def legacy(path, change=None) -> None:
    """Rewrite ``path`` as today's code wrote it: no checksum (after ``change(state)``)."""
    state = torch.load(path, weights_only=True)
    state.pop("checksum", None)
    if change is not None:
        change(state)
    torch.save(state, path)


def _rename_checksum(path):
    state = torch.load(path, weights_only=True)
    state["chacksum"] = state.pop("checksum")
    torch.save(state, path)


def _nan_weight(state):
    next(iter(state["ema"].values())).view(-1)[0] = math.nan


FAULTS = {
    "flipped tensor byte": flip_tensor_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "text file": lambda p: p.write_text("not a checkpoint\n"),
    "a tensor": lambda p: torch.save(torch.zeros(3), p),
    "missing keys": lambda p: torch.save({"model": {}}, p),
    "renamed checksum": _rename_checksum,
    "legacy with NaN weights": lambda p: legacy(p, _nan_weight),
    "legacy with NaN loss": lambda p: legacy(p, lambda s: s["history"].__setitem__(3, math.nan)),
    "legacy of another network": lambda p: legacy(p, lambda s: s.__setitem__("model", {})),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_checkpoints_raise_one_error_that_says_how_to_restart(tmp_path, fault):
    cfg, path = finished(tmp_path)
    FAULTS[fault](path)
    with pytest.raises(train.CheckpointError, match=re.escape(str(path))) as info:
        fit(cfg, tmp_path)
    assert "delete" in str(info.value)
    if fault != "legacy of another network":  # only fit knows the network
        with pytest.raises(train.CheckpointError, match=re.escape(str(path))):
            train.load_checkpoint(path)


def test_checkpoints_carry_a_checksum_and_old_ones_still_load(tmp_path):
    cfg, path = finished(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["checksum"].startswith("sha256:")
    assert "checksum" not in train.load_checkpoint(path)
    legacy(path)  # checkpoints of the code before checksums: loaded, unverifiable
    again = fit(cfg, tmp_path)
    assert again.loaded and len(again.history) == 10


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_are_removed_when_a_run_starts(tmp_path):
    cfg = config(steps=2, warmup=0)
    folder = train.run_dir(cfg, images(), tmp_path)
    folder.mkdir(parents=True)
    dead, live = _dead_pid(), os.getppid()
    stale = [f".{train.CHECKPOINT}.{dead}.tmp", f".eval-0123abcd.pt.{dead}.tmp"]
    kept = [f".{train.CHECKPOINT}.{live}.tmp", "notes.tmp", ".checkpoint.pt.x.tmp"]
    for name in stale + kept:
        (folder / name).write_bytes(b"partial")
    fit(cfg, tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert not names & set(stale)
    assert set(kept) <= names


def _assert_nothing_saved(cfg, root) -> None:
    folder = train.run_dir(cfg, images(), root)
    assert not (folder / train.DONE).exists()
    assert not (folder / train.CHECKPOINT).exists()


def test_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path):
    cfg = config(lr=1e30, warmup=0)  # measured: a finite loss, then NaN from step 2
    with pytest.raises(FloatingPointError, match="step 2 of 20") as info:
        fit(cfg, tmp_path)
    assert all(word in str(info.value) for word in ("images", "lr", "sigma_max"))
    _assert_nothing_saved(cfg, tmp_path)


def test_huge_images_give_a_non_finite_loss_at_the_first_step(tmp_path):
    cfg = config()
    huge = images() * 1e30
    with pytest.raises(FloatingPointError, match="step 1 of 20"):
        train.fit(cfg, huge, device="cpu", root=tmp_path, progress=False)
    assert not (train.run_dir(cfg, huge, tmp_path) / train.DONE).exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    update = train._update_ema

    def diverge(ema, model, decay):  # the loss stays finite, the EMA does not
        update(ema, model, decay)
        next(ema.parameters()).data.fill_(math.inf)

    monkeypatch.setattr(train, "_update_ema", diverge)
    cfg = config(steps=1, warmup=0)
    with pytest.raises(FloatingPointError, match="step 1 of 1"):
        fit(cfg, tmp_path)
    _assert_nothing_saved(cfg, tmp_path)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (images().mul(255).to(torch.uint8), "floating"),
        (images().double().masked_fill(images() > 0.9, math.nan), "NaN"),
        (images().masked_fill(images() > 0.9, math.inf), "infinite"),
    ],
)
def test_integer_or_non_finite_images_are_rejected_before_any_folder(tmp_path, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        train.fit(config(), bad, device="cpu", root=tmp_path, progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_operator_not_fitting_the_images_fails_before_any_folder(tmp_path):
    with pytest.raises(ValueError, match="box"):
        fit(config(operator="inpainting_center:9"), tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


BAD_FIELDS = [
    ("net", "vit"),
    ("preset", "huge"),
    ("patch_size", 4),
    ("patch_size", 5.0),
    ("channels", 0),
    ("channels", 1.0),
    ("dataset", 3),
    ("dataset", ""),
    ("n_train", 0),
    ("size", 0),
    ("size", 28.0),
    ("preinverse", "inverse"),
    ("steps", 0),
    ("steps", 20.0),
    ("steps", True),
    ("batch_size", 0),
    ("lr", math.inf),
    ("lr", math.nan),
    ("lr", 0.0),
    ("lr", "1e-3"),
    ("lr_floor", 0.0),
    ("lr_floor", 1.0),
    ("lr_floor", math.nan),
    ("warmup", -1),
    ("warmup", 20),
    ("warmup", 1.5),
    ("weight_decay", math.nan),
    ("weight_decay", -0.1),
    ("weight_decay", math.inf),
    ("ema_decay", 1.0),
    ("ema_decay", -0.1),
    ("ema_decay", math.nan),
    ("grad_clip", 0.0),
    ("grad_clip", math.inf),
    ("grad_clip", math.nan),
    ("sigma_max", 0.0),
    ("sigma_max", -1.0),
    ("sigma_max", math.inf),
    ("sigma_max", math.nan),
    ("seed", 1.0),
    ("seed", -1),
    ("seed", True),
    ("seed", 2**40),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS)
def test_config_rejects_each_bad_field_by_name(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        config(**{name: value})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"preinverse": "tikhonov", "lam": -1.0}, "lam"),
        ({"preinverse": "tikhonov", "lam": math.nan}, "lam"),
        ({"preinverse": "tikhonov"}, "lam"),
        ({"lam": 0.1}, "lam"),
        ({"operator": "blur_gaussian:-1"}, "std"),
        ({"operator": "blur_gaussian:nan"}, "std"),
        ({"operator": "blur_gaussian:wide"}, "operator"),
        ({"operator": "blur_defocus:0"}, "radius"),
        ({"operator": "inpainting_random:0"}, "fraction"),
        ({"operator": "inpainting_random:1.5"}, "fraction"),
        ({"operator": "inpainting_center:0"}, "box"),
        ({"operator": "inpainting_center:2.5"}, "box"),
        ({"operator": 3}, "operator"),
    ],
)
def test_config_rejects_bad_operators_and_lam(changes, match):
    with pytest.raises((TypeError, ValueError), match=match):
        config(**changes)
