"""Offline, seeded, CPU-only test setup."""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# transformers copies remote-code modules (GR00T N1.5's Eagle) here; read at its import, so set it now
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="vlaprune-hf-modules-"))

import pytest
import torch

# Tiny models: one thread is faster than two, and immune to another job on the cores (two OpenMP
# threads spin-waiting on a busy core made a tiny forward 100x slower).
torch.set_num_threads(1)

TINY_SPECS = ("tiny:smolvla", "tiny:pi0", "tiny:pi05")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated config/tokenizer directories go to a per-session folder, not the user's cache."""
    os.environ["VLAPRUNE_CACHE"] = str(tmp_path_factory.mktemp("vlaprune-cache"))


@pytest.fixture(scope="session")
def tiny():
    """``tiny(spec)``: a built tiny policy bundle, built once per session and shared READ-ONLY
    (build your own with ``load_policy`` to mutate one)."""
    from vlaprune import load_policy

    built: dict = {}

    def get(spec: str):
        if spec not in built:
            built[spec] = load_policy(spec)
        return built[spec]

    return get
