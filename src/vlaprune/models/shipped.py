"""The trained model shipped with vlaprune: a small SmolVLA pretrained on MetaWorld, and its calibration set.

``metaworld:smolvla`` (``--policy.path=metaworld:smolvla``) is a 12 + 12 layer SmolVLA (3.6M
parameters, 64 px camera) trained from scratch with ``lerobot-train`` on scripted demonstrations of
MT10 minus the two held-out tasks (``benchmarks/metaworld_pretrain.py --ship`` regenerates it). The
calibration set holds demonstrations of the held-out tasks (``HELD_OUT``): the data to calibrate and
fine-tune on, never seen in pretraining.

The repository stores the checkpoint with a placeholder where LeRobot expects the path of the VLM's
config and tokenizer (generated offline, per machine: :func:`vlaprune.models.builtin.smolvla.smolvlm_dir`).
:func:`policy_dir` fills it in and caches a ready LeRobot checkpoint directory, usable by
``lerobot-train`` and ``lerobot-eval`` as well.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from vlaprune.io.cache import generated_dir

SPEC = "metaworld:smolvla"
ASSETS = Path(__file__).parents[1] / "assets" / "metaworld"
POLICY_DIR = ASSETS / "policy"  # as stored: VLM paths replaced by VLM_PLACEHOLDER
CALIBRATION_ROOT = ASSETS / "heldout"
CALIBRATION_REPO_ID = "local/metaworld_heldout"
HELD_OUT = ("drawer-close-v3", "window-close-v3")  # left out of pretraining, for fine-tuning
IMAGE_SIZE = 64
VLM_PLACEHOLDER = "vlaprune:smolvlm-small"
_PATH_FILES = ("config.json", "policy_preprocessor.json")  # the files that name the VLM directory


def policy_dir() -> Path:
    """A LeRobot checkpoint directory of the shipped policy, with this machine's VLM paths (cached)."""
    from vlaprune.models.builtin import smolvla

    weights = POLICY_DIR / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the shipped model comes with the repository (a clone "
                                "without it is incomplete); regenerate it with benchmarks/metaworld_pretrain.py --ship")
    vlm = smolvla.smolvlm_dir("small")
    digest = hashlib.sha256()
    for path in sorted(POLICY_DIR.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    payload = {"files": digest.hexdigest(), "vlm": str(vlm)}
    return generated_dir("metaworld-smolvla", payload, marker="model.safetensors",
                         write=lambda tmp: _copy(POLICY_DIR, tmp, VLM_PLACEHOLDER, str(vlm)))


def export(checkpoint: Path, dest: Path) -> None:
    """Store ``checkpoint`` (a trained ``small`` SmolVLA) at ``dest`` in the shipped form (atomically)."""
    from vlaprune.models.builtin import smolvla

    config = json.loads((checkpoint / "config.json").read_text())
    vlm = str(smolvla.smolvlm_dir("small"))
    if config.get("type") != "smolvla" or config.get("vlm_model_name") != vlm:
        raise ValueError(f"{checkpoint} is not a small SmolVLA built on this machine (type {config.get('type')!r}, "
                         f"vlm_model_name {config.get('vlm_model_name')!r}, expected {vlm!r})")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _copy(checkpoint, tmp, vlm, VLM_PLACEHOLDER)
    (tmp / "config.json").write_text(  # provenance of this machine's training run: not needed to load
        json.dumps({**json.loads((tmp / "config.json").read_text()), "pretrained_path": None}, indent=4))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _copy(src: Path, dest: Path, old: str, new: str) -> None:
    """Copy a checkpoint's files (not train_config.json: training provenance) swapping the VLM path."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.name == "train_config.json" or not path.is_file():
            continue
        if path.name in _PATH_FILES:
            text = path.read_text()
            if old not in text:
                raise ValueError(f"{path} does not name the VLM directory {old!r}")
            (dest / path.name).write_text(text.replace(old, new))
        else:
            shutil.copyfile(path, dest / path.name)
