import pytest
import torch

from lemmse_core import profiles, runtime


def test_profiles_share_keys_and_default_is_quick(monkeypatch):
    assert set(profiles.PROFILES["quick"]) == set(profiles.PROFILES["paper"])
    monkeypatch.delenv("LEMMSE_PROFILE", raising=False)
    assert profiles.name() == "quick"
    monkeypatch.setenv("LEMMSE_PROFILE", "paper")
    assert profiles.current()["n_train"] > profiles.PROFILES["quick"]["n_train"]


def test_unknown_profile_is_rejected(monkeypatch):
    monkeypatch.setenv("LEMMSE_PROFILE", "huge")
    with pytest.raises(ValueError, match="LEMMSE_PROFILE"):
        profiles.current()


def test_seed_everything_is_reproducible():
    g = runtime.seed_everything(3)
    a = torch.rand(3), torch.rand(2, generator=g)
    g = runtime.seed_everything(3)
    assert torch.equal(a[0], torch.rand(3)) and torch.equal(a[1], torch.rand(2, generator=g))
    assert runtime.device().type in ("cpu", "cuda")
