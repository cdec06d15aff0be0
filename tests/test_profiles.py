import pytest
import torch

from lemmse_core import profiles, runtime


def test_profiles_have_the_same_chapters_and_keys():
    quick, paper = profiles.PROFILES["quick"], profiles.PROFILES["paper"]
    assert set(quick) == set(paper)
    for chapter in quick:
        assert set(quick[chapter]) == set(paper[chapter]), chapter


def test_default_profile_is_quick(monkeypatch):
    monkeypatch.delenv("LEMMSE_PROFILE", raising=False)
    assert profiles.name() == "quick"
    monkeypatch.setenv("LEMMSE_PROFILE", "paper")
    assert profiles.settings("tour")["n_train"] > profiles.PROFILES["quick"]["tour"]["n_train"]


def test_unknown_profile_or_chapter_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="chapter"):
        profiles.settings("nope")
    monkeypatch.setenv("LEMMSE_PROFILE", "huge")
    with pytest.raises(ValueError, match="LEMMSE_PROFILE"):
        profiles.settings("tour")


def test_seed_everything_is_reproducible():
    g = runtime.seed_everything(3)
    a = torch.rand(3), torch.rand(2, generator=g)
    g = runtime.seed_everything(3)
    assert torch.equal(a[0], torch.rand(3)) and torch.equal(a[1], torch.rand(2, generator=g))
    assert runtime.device().type in ("cpu", "cuda")
