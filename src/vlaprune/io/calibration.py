"""Calibration batches: seeded frames from a LeRobotDataset (or synthetic frames), through the policy's
own preprocessor, so the analysis sees exactly what the policy sees in fine-tuning."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SYNTHETIC_TASKS = (
    "pick up the red cube",
    "open the top drawer",
    "push the button",
    "close the door",
    "put the block in the bowl",
    "turn the faucet on",
)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which frames feed the calibration pass."""

    num_samples: int = 32
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"calibration.num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"calibration.batch_size must be >= 1, got {self.batch_size}")

    def holdout(self, num_samples: int) -> CalibrationConfig:
        """The held-out frames beside these (refine, verify, the loss planner): another seed, same batch size."""
        return CalibrationConfig(num_samples=num_samples, batch_size=self.batch_size, seed=self.seed + 10_007)

    @property
    def batch_sizes(self) -> list[int]:
        full, rest = divmod(self.num_samples, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])


def describe_calibration(repo_id: str, root: str | Path | None, config: CalibrationConfig) -> dict[str, Any]:
    """The record of where calibration frames came from, saved with every analysis and pruned checkpoint."""
    return {
        "source": repo_id,
        "root": None if root is None else str(root),
        "synthetic": repo_id == SYNTHETIC,
        "num_samples": config.num_samples,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


def required_features(policy_config: Any) -> dict[str, Any]:
    """Features a calibration frame must carry: the policy's inputs and its action."""
    return {**policy_config.input_features, **policy_config.output_features}


def synthetic_batches(policy_config: Any, config: CalibrationConfig) -> Iterator[dict[str, Any]]:
    """Seeded random raw batches with the policy's features (images in [0, 1], standard-normal
    state and action chunks, instructions from a small fixed list). Labelled ``synthetic``."""
    gen = torch.Generator().manual_seed(config.seed)
    chunk = len(policy_config.action_delta_indices) if policy_config.action_delta_indices else 1
    start = 0
    for size in config.batch_sizes:
        batch: dict[str, Any] = {}
        for key, feat in required_features(policy_config).items():
            shape = tuple(feat.shape)
            if key.startswith("observation.images."):
                batch[key] = torch.rand((size, *shape), generator=gen)
            elif key == "action":
                batch[key] = torch.randn((size, chunk, *shape), generator=gen)
                batch["action_is_pad"] = torch.zeros((size, chunk), dtype=torch.bool)
            else:
                batch[key] = torch.randn((size, *shape), generator=gen)
        batch["task"] = [SYNTHETIC_TASKS[(start + i) % len(SYNTHETIC_TASKS)] for i in range(size)]
        start += size
        yield batch


def dataset_batches(
    policy_config: Any, repo_id: str, root: str | Path | None, config: CalibrationConfig
) -> Iterator[dict[str, Any]]:
    """Raw batches of seeded frames spread over the episodes of a LeRobotDataset.

    Frames are drawn round-robin over a seeded order of the episodes (one frame per episode per
    round, uniform within the episode), so a few samples already cover many episodes.
    """
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    meta = dataset_metadata(repo_id, root)
    missing = [key for key in required_features(policy_config) if key not in meta.features]
    if missing:
        raise ValueError(
            f"dataset {repo_id!r} lacks feature(s) {missing} that the policy needs; it has "
            f"{sorted(meta.features)}. Pick a dataset recorded with the policy's cameras and state, "
            "or rename its keys."
        )
    dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=resolve_delta_timestamps(policy_config, meta),
                             video_backend=video_backend())
    indices = spread_frame_indices(_episode_bounds(dataset), config.num_samples, config.seed)
    start = 0
    for size in config.batch_sizes:
        frames = [dataset[i] for i in indices[start : start + size]]
        start += size
        yield _collate(frames)


def dataset_metadata(repo_id: str, root: str | Path | None) -> Any:
    """``LeRobotDatasetMetadata`` of a local dataset directory, or of a hub dataset (cached or downloaded),
    with errors that name the directory or the repo id instead of a hub traceback."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    if root is not None and not (Path(root) / "meta" / "info.json").is_file():
        what = "does not exist" if not Path(root).exists() else "holds no LeRobotDataset (no meta/info.json)"
        raise FileNotFoundError(f"--dataset.root={root} {what}: give the directory of a LeRobotDataset, or leave "
                                "--dataset.root out to use the hub's copy of --dataset.repo_id")
    try:
        return LeRobotDatasetMetadata(repo_id, root=root)
    except OfflineModeIsEnabled as err:
        raise FileNotFoundError(f"dataset {repo_id!r} is not on this machine and the hub is offline "
                                "(HF_HUB_OFFLINE=1): give its local directory with --dataset.root") from err


@functools.cache
def video_backend() -> str:
    """LeRobot's default video decoder when it loads (torchcodec needs FFmpeg's shared libraries), else
    PyAV, chosen without LeRobot's warning and its page of tracebacks when torchcodec cannot load."""
    import importlib

    try:
        importlib.import_module("torchcodec")
    except Exception as err:  # torchcodec raises RuntimeError with every FFmpeg version's traceback
        logger.debug("torchcodec cannot load (%s); decoding video with pyav", type(err).__name__)
        return "pyav"
    return "torchcodec"


def _episode_bounds(dataset: Any) -> list[tuple[int, int]]:
    episodes = dataset.meta.episodes
    starts, ends = episodes["dataset_from_index"], episodes["dataset_to_index"]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True) if int(b) > int(a)]


def spread_frame_indices(bounds: list[tuple[int, int]], num_samples: int, seed: int) -> list[int]:
    """``num_samples`` distinct frame indices, round-robin over a seeded shuffle of the episodes."""
    if not bounds:
        raise ValueError("the dataset has no frames")
    total = sum(b - a for a, b in bounds)
    if num_samples > total:
        raise ValueError(f"calibration.num_samples={num_samples} exceeds the dataset's {total} frames")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(bounds), generator=gen).tolist()
    remaining = {e: torch.randperm(bounds[e][1] - bounds[e][0], generator=gen).tolist() for e in order}
    picked: list[int] = []
    while len(picked) < num_samples:
        for e in order:
            if remaining[e] and len(picked) < num_samples:
                picked.append(bounds[e][0] + remaining[e].pop())
    return picked


def _collate(frames: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in frames[0]:
        values = [f[key] for f in frames]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def calibration_batches(
    policy: Any,
    preprocessor: Any,
    *,
    repo_id: str,
    root: str | Path | None,
    config: CalibrationConfig,
    allow_synthetic: bool,
    synthetic: Callable[[CalibrationConfig], Iterator[dict[str, Any]]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Preprocessed calibration batches for ``policy`` (synthetic only where ``allow_synthetic``).

    ``synthetic`` replaces the feature-based synthetic frames for policies whose inputs are not
    LeRobot features; ``preprocessor=None`` passes batches through unchanged."""
    if repo_id == SYNTHETIC:
        if not allow_synthetic:
            raise ValueError(
                "--dataset.repo_id=synthetic is only allowed for the built-in policies (tiny:*, real:*); "
                "give a LeRobotDataset recorded for this policy (--dataset.repo_id / --dataset.root)"
            )
        raw: Iterator[dict[str, Any]] = synthetic(config) if synthetic else synthetic_batches(policy.config, config)
    elif not hasattr(policy.config, "input_features"):
        raise ValueError(
            f"{type(policy).__name__} takes no LeRobot features, so it cannot be calibrated from the dataset "
            f"{repo_id!r}: GR00T N1.5 calibration from a LeRobotDataset needs its Eagle processor, which vlaprune "
            "does not run. Use the Python API with batches of the model's inputs"
        )
    else:
        raw = dataset_batches(policy.config, repo_id, root, config)
    for batch in raw:
        yield batch if preprocessor is None else preprocessor(batch)
