"""Experiments engine: specs, grids, evaluation against the formula, caches, command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from test_data import needs

import lemmse_core as lc
from lemmse_core import experiments as ex
from lemmse_core import nets
from lemmse_core.experiments import engine
from lemmse_core.experiments.__main__ import main

SIGMAS = (0.2, 0.5)


def tiny(**changes) -> ex.Spec:
    values = {
        "n_train": 20,
        "steps": 60,
        "batch_size": 4,
        "patch_size": 3,
        "eval_train": 2,
        "eval_test": 2,
        "sigmas": SIGMAS,
        "task": "inpainting_center:13",
        "preinverse": "adjoint",
    }
    return ex.Spec(**{**values, **changes})


def run(spec, root, **kwargs):
    return ex.run(spec, root=root, device="cpu", progress=False, **kwargs)


# ------------------------------------------------------------------------------ specs


def test_spec_round_trips_through_json_and_is_hashable():
    spec = tiny(lam=None)
    again = ex.Spec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec)
    assert json.loads(spec.to_json())["sigmas"] == list(SIGMAS)
    assert spec.task_name == "inpainting" and spec.channels == 1
    assert ex.Spec(dataset="cifar10", color=True).name.startswith("cifar10rgb-denoising")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dataset": "imagenet"}, "dataset"),
        ({"preinverse": "inverse"}, "preinverse"),
        ({"preinverse": "tikhonov"}, "lam"),
        ({"lam": 0.1}, "lam"),
        ({"preinverse": "tikhonov", "lam": -1.0}, "lam"),
        ({"sigmas": ()}, "sigmas"),
        ({"sigmas": (0.1, float("nan"))}, "sigmas"),
        ({"sigmas": (0.1, 0.1)}, "distinct"),
        ({"eval_test": -1}, "eval_test"),
        ({"eval_train": 21}, "eval_train"),
        ({"arch": "vit"}, "net"),
        ({"task": "blur"}, "operator"),
        ({"color": 1}, "color"),
    ],
)
def test_spec_rejects_bad_fields(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny(**changes)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="unknown Spec fields"):
        ex.Spec.from_dict({**tiny().to_dict(), "epochs": 3})


def test_quick_grid_covers_the_issue():
    specs = ex.grid("quick")
    fashion = ex.select(specs, dataset="fashionmnist", arch="unet")
    kinds = {(s.task_name, s.preinverse != "identity") for s in fashion}
    assert kinds >= {("denoising", False), ("inpainting", False), ("inpainting", True)}
    assert kinds >= {("deconvolution", False), ("deconvolution", True)}
    for dataset in ("fashionmnist", "cifar10"):
        denoisers = ex.select(specs, dataset=dataset, task_name="denoising")
        assert {s.arch for s in denoisers} == set(ex.ARCHS)
    cifar = ex.select(specs, dataset="cifar10")
    assert all(s.color for s in cifar)
    assert {s.task_name for s in cifar} & {"inpainting", "deconvolution"}
    assert len({s.name for s in specs}) == len(specs)


def test_paper_grid_is_the_full_grid():
    specs = ex.grid("paper")
    assert len(specs) == 3 * 3 * 6
    assert {s.dataset for s in specs} == {"fashionmnist", "cifar10", "ffhq"}
    assert {s.preinverse for s in specs} == {"identity", "adjoint", "pinv", "tikhonov"}
    assert {s.preset for s in specs} == {"paper"}
    assert ex.select(specs, dataset="cifar10", task="inpainting_center:15")
    assert ex.select(specs, dataset="fashionmnist", task="inpainting_center:13")
    with pytest.raises(ValueError, match="profile"):
        ex.grid("huge")
    with pytest.raises(ValueError, match="no spec"):
        ex.select(specs, arch="vit")


def test_cli_lists_the_paper_grid_as_json(capsys):
    assert main(["list", "--profile", "paper", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == len(ex.grid("paper", "all"))
    fields = {"dataset", "n_train", "size", "color", "task", "preinverse", "lam", "arch"}
    fields |= {"patch_size", "preset", "steps", "batch_size", "lr", "eval_train", "eval_test"}
    fields |= {"sigmas", "seed", "eval_dataset", "diagnostics"}
    assert all(fields <= set(item) for item in listed)
    assert ex.Spec.from_dict({k: v for k, v in listed[0].items() if k != "name"})
    assert main(["list", "--profile", "quick", "--only", "cifar10*unet*"]) == 0
    out = capsys.readouterr().out
    assert "3 specs" in out and "onffhq" in out
    assert main(["list", "--profile", "quick", "--study", "table2", "--only", "cifar10*unet*"]) == 0
    assert "2 specs" in capsys.readouterr().out


def test_studies_share_the_runs_of_table2():
    table2 = ex.grid("quick")
    union = ex.grid("quick", "all")
    assert union[: len(table2)] == [s.replace(diagnostics=s.name in _DIAGNOSED) for s in table2]
    assert len({s.replace(diagnostics=False) for s in union}) == len(union)
    assert len({s.name for s in union}) == len(union)
    for study in ex.STUDIES:
        for spec in ex.grid("quick", study):  # every spec of a study is run by make runs
            assert spec.replace(diagnostics=False) in {s.replace(diagnostics=False) for s in union}
            if spec.diagnostics:
                assert spec in union
    sizes = {s.patch_size for s in ex.grid("quick", "patch_size")}
    assert sizes >= {3, 5, 7}
    n_trains = [s.n_train for s in ex.grid("quick", "dataset_size")]
    assert max(n_trains) >= 10 * min(n_trains)
    pairs = {(s.dataset, s.eval_dataset) for s in ex.grid("paper", "ood")}
    assert pairs == {("fashionmnist", "mnist"), ("cifar10", "ffhq"), ("ffhq", "cifar10")}
    with pytest.raises(ValueError, match="study"):
        ex.grid("quick", "density2")


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_resolution_study_is_the_three_tasks_at_64(profile):
    specs = ex.grid(profile, "resolution")
    assert [s.task_name for s in specs] == ["denoising", "inpainting", "deconvolution"]
    assert {(s.dataset, s.size, s.color, s.preinverse) for s in specs} == {
        ("ffhq", 64, True, "identity")
    }
    assert ex.select(specs, task="inpainting_center:30")
    assert len({(s.n_train, s.batch_size, s.steps) for s in specs}) == 1


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_other_networks_study_is_trained_as_the_unet(profile):
    specs = {s.arch: s for s in ex.grid(profile, "other_networks")}
    assert set(specs) == set(nets.OTHER_NETS)
    unet = ex.select(ex.grid(profile, "patch_size"), patch_size=5)[0]
    same = ("dataset", "size", "color", "n_train", "task", "preinverse", "batch_size", "lr")
    for spec in specs.values():
        assert all(getattr(spec, k) == getattr(unet, k) for k in same)
    # the strided U-Net is compared with the U-Net's LE-MMSE: one formula evaluation
    assert specs["stridedunet"].formula_fields() == unet.formula_fields()
    side = unet.size or 28
    assert 5 < specs["dncnn"].patch_size < side  # a large field, smaller than the image
    assert set(specs["dncnn"].sigmas) <= set(unet.sigmas)  # the chapter compares them


_DIAGNOSED = {
    "fashionmnist-denoising-identity-unet-p5-n1000",
    "cifar10rgb-denoising-identity-unet-p5-n1000",
}


def test_diagnostics_and_eval_dataset_are_not_formula_fields():
    spec = tiny()
    assert spec.replace(diagnostics=True).formula_fields() == spec.formula_fields()
    assert spec.replace(eval_dataset="mnist").formula_fields() != spec.formula_fields()
    assert spec.replace(eval_dataset="mnist").name.endswith("-onmnist")
    with pytest.raises(ValueError, match="eval_dataset"):
        tiny(eval_dataset="imagenet")
    with pytest.raises(TypeError, match="diagnostics"):
        tiny(diagnostics=1)


# ------------------------------------------------------------------------- evaluation


@needs("fashionmnist")
def test_run_matches_the_formula_and_the_network_and_is_cached(tmp_path):
    spec = tiny()
    result = run(spec, tmp_path)
    assert set(result.computed) == {"training", "formula", "net"}
    table = result.table
    assert list(table.columns) == list(ex.COLUMNS)
    assert len(table) == len(SIGMAS) * (spec.eval_train + spec.eval_test)
    assert set(table.split) == {"train", "test"} and set(table.sigma) == set(SIGMAS)

    train_images = lc.data.load("fashionmnist", n=spec.n_train)
    A, B = spec.operators(tuple(train_images.shape[1:]))
    formula = lc.LEMMSE(train_images, A, spec.patch_size, B)
    out = result.outputs("test", 0.5)
    assert torch.equal(out.x, lc.data.load("fashionmnist", split="test", n=2))
    torch.testing.assert_close(out.v, B.A(out.y), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.formula, formula(out.y.double(), 0.5), atol=2e-6, rtol=0)
    with torch.no_grad():
        net = result.run.ema_model(out.v, 0.5)
    torch.testing.assert_close(out.net, net, atol=1e-6, rtol=0)
    row = table[(table.split == "test") & (table.sigma == 0.5) & (table.image == 1)].iloc[0]
    expected = lc.metrics.psnr(out.net[1:], out.formula[1:]).item()
    assert row.psnr_net_formula == pytest.approx(expected, abs=1e-4)

    again = run(spec, tmp_path)
    assert again.computed == () and again.run.loaded
    assert again.table.equals(table)
    with pytest.raises(ValueError, match="sigma"):
        result.outputs("test", 0.3)
    with pytest.raises(ValueError, match="split"):
        result.outputs("val", 0.5)


@needs("fashionmnist")
@needs("mnist")
def test_diagnostics_are_cached_with_the_formula_and_exact(tmp_path):
    spec = tiny(task="denoising", preinverse="identity", eval_dataset="mnist")
    plain = run(spec, tmp_path)
    with pytest.raises(ValueError, match="diagnostics=True"):
        plain.diagnostics("test", 0.2)
    result = run(spec.replace(diagnostics=True), tmp_path)
    assert result.computed == ("formula",)  # the network's outputs are shared
    out = result.outputs("test", 0.2)
    assert torch.equal(out.x, lc.data.load("mnist", split="test", n=2))
    assert torch.equal(out.formula, plain.outputs("test", 0.2).formula)  # not recomputed
    train_images = lc.data.load("fashionmnist", n=spec.n_train)
    A, B = spec.operators(tuple(train_images.shape[1:]))
    engine_ = lc.LEMMSE(train_images, A, spec.patch_size, B, dtype=torch.float64)
    _, want = engine_.estimate(B.A(out.y.double()), 0.2, diagnostics=True, top_k=1)
    diag = result.diagnostics("test", 0.2)
    assert diag.log_density.shape == out.x.shape[:1] + out.x.shape[2:]
    torch.testing.assert_close(diag.log_density.double(), want.log_density, atol=1e-3, rtol=0)
    assert torch.equal(diag.rank, want.rank)
    assert (diag.top_image == want.top_image[..., 0]).float().mean() > 0.95
    again = run(spec.replace(diagnostics=True), tmp_path)
    assert again.computed == ()
    assert torch.equal(again.diagnostics("test", 0.2).top_image, diag.top_image)


@needs("fashionmnist")
@needs("mnist")
def test_out_of_distribution_shares_the_training_split(tmp_path, monkeypatch):
    """The training split of an ``eval_dataset`` spec is that of the in-distribution one:
    computed once; the test split is its own."""
    spec = tiny(task="denoising", preinverse="identity")
    inside = run(spec, tmp_path)
    calls = []
    original = lc.LEMMSE.estimate

    def estimate(self, v, sigma, **kwargs):
        calls.append(sigma)
        return original(self, v, sigma, **kwargs)

    monkeypatch.setattr(lc.LEMMSE, "estimate", estimate)
    outside = run(spec.replace(eval_dataset="mnist"), tmp_path)
    assert calls == list(SIGMAS)  # the test split only
    for sigma in SIGMAS:
        a, b = inside.outputs("train", sigma), outside.outputs("train", sigma)
        assert torch.equal(a.formula, b.formula) and torch.equal(a.net, b.net)
        assert not torch.equal(inside.outputs("test", sigma).x, outside.outputs("test", sigma).x)
    assert len(list((tmp_path / "formula").glob("*.pt"))) == 3  # train, test, test (MNIST)


@needs("cifar10")
@needs("ffhq")
def test_eval_dataset_takes_the_training_side_and_channels():
    spec = ex.Spec(dataset="cifar10", color=True, eval_dataset="ffhq", eval_test=4)
    train_images, images = engine._load_images(spec)
    assert images["test"].shape == (4, 3, 32, 32)
    assert torch.equal(images["test"], lc.data.load("ffhq", split="test", n=4, size=32))
    with pytest.raises(ValueError, match="only 5 FFHQ test images"):
        engine._load_images(spec.replace(eval_test=6))


@needs("fashionmnist")
def test_architectures_share_the_formula_and_the_noise(tmp_path):
    grid = run([tiny(), tiny(arch="resnet")], tmp_path)
    assert "formula" in grid[0].computed and "formula" not in grid[1].computed
    a, b = (r.outputs("train", 0.2) for r in grid)
    assert torch.equal(a.y, b.y) and torch.equal(a.formula, b.formula)
    assert not torch.equal(a.net, b.net)
    assert len(grid.table) == 2 * len(grid[0].table)
    pairs = ex.architectures(grid)
    assert len(pairs) == 2 * len(SIGMAS)
    assert set(ex.table2(grid.table).columns) == {"train", "test"}
    assert "2 runs: 2 trained now" in grid.summary()


@needs("fashionmnist")
def test_interrupted_evaluation_resumes_where_it_stopped(tmp_path, monkeypatch):
    spec, calls, limit = tiny(), [], [2]
    original = lc.LEMMSE.estimate

    def estimate(self, v, sigma, **kwargs):
        if len(calls) == limit[0]:
            raise KeyboardInterrupt
        calls.append(sigma)
        return original(self, v, sigma, **kwargs)

    monkeypatch.setattr(lc.LEMMSE, "estimate", estimate)
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path)
    calls.clear()
    limit[0] = None
    result = run(spec, tmp_path)
    assert len(calls) == 2 * len(SIGMAS) - 2  # only the entries not cached before
    assert "formula" in result.computed and "training" not in result.computed


@needs("fashionmnist")
def test_non_finite_outputs_are_never_cached(tmp_path, monkeypatch):
    spec = tiny()
    monkeypatch.setattr(
        lc.LEMMSE, "estimate", lambda self, v, sigma, **k: torch.full_like(v, torch.nan)
    )
    with pytest.raises(FloatingPointError, match="non-finite"):
        run(spec, tmp_path)
    assert not list((tmp_path / "formula").glob("*.pt"))
    monkeypatch.undo()
    assert "formula" in run(spec, tmp_path).computed


@needs("fashionmnist")
def test_finished_only_computes_nothing(tmp_path):
    spec = tiny()
    assert engine.run_one(spec, root=tmp_path, finished_only=True, device="cpu") is None
    assert not any(tmp_path.iterdir())
    run(spec, tmp_path)
    assert engine.run_one(spec, root=tmp_path, finished_only=True).computed == ()


def test_progress_follows_the_environment(monkeypatch):
    monkeypatch.setenv("LEMMSE_PROGRESS", "0")
    assert not ex.progress_enabled(None) and ex.progress_enabled(True)
    monkeypatch.delenv("LEMMSE_PROGRESS")
    assert ex.progress_enabled(None)


# ------------------------------------------------------------------------ cache files


def _cache(tmp_path, key="k") -> engine._Cache:
    cache = engine._Cache(tmp_path / "formula" / "abc.pt", key)
    cache.put("test", 0.5, torch.rand(2, 1, 4, 4), "the formula")
    return cache


def test_cache_files_carry_a_checksum_and_old_ones_still_load(tmp_path):
    cache = _cache(tmp_path)
    assert torch.load(cache.path, weights_only=True)["checksum"].startswith("sha256:")
    torch.save({"key": "k", "entries": cache.entries}, cache.path)  # as before checksums
    again = engine._Cache(cache.path, "k")
    assert torch.equal(again.get("test", 0.5), cache.get("test", 0.5))


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state["entries"]["test/0.5"].view(-1).__setitem__(3, 0.25),
        lambda state: state["entries"]["test/0.5"].view(-1).__setitem__(3, torch.nan),
        lambda state: state.pop("checksum") and state.__setitem__("extra", 1),
    ],
    ids=["changed value", "NaN value", "checksum removed"],
)
def test_damaged_cache_files_raise_and_name_the_file(tmp_path, damage):
    cache = _cache(tmp_path)
    state = torch.load(cache.path, weights_only=True)
    damage(state)
    torch.save(state, cache.path)
    with pytest.raises(lc.train.CheckpointError, match=re.escape(str(cache.path))) as info:
        engine._Cache(cache.path, "k")
    assert "delete" in str(info.value)


def test_stale_cache_temporaries_are_removed(tmp_path):
    folder = tmp_path / "formula"
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale, kept = folder / f".abc.pt.{child.pid}.tmp", folder / f".abc.pt.{os.getppid()}.tmp"
    for path in (stale, kept):
        path.write_bytes(b"partial")
    engine._Cache(folder / "abc.pt", "k")
    assert not stale.exists() and kept.exists()
