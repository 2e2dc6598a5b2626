"""``vlaprune analyze``: one calibration pass, a CKA matrix per stack, written as JSON and heatmaps."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import CaptureConfig, collect_residuals
from .cka import CKAConfig, StreamingCKA, StreamingCosine
from .config import AnalyzeConfig
from .families import family_for
from .families.base import Family
from .outputs import prepare_output_dir, write_atomically

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackAnalysis:
    """CKA between the L+1 residual states of one stack (index 0 = stack input, i = output of block i-1)."""

    name: str
    num_layers: int
    cka: tuple[tuple[float, ...], ...]
    cosine: tuple[tuple[float, ...], ...]  # mean token-wise cosine between the same states
    num_updates: int
    num_examples: int

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> StackAnalysis:
        """The inverse of the per-stack entry of :meth:`Analysis.to_json`."""
        return cls(
            name=name,
            num_layers=data["num_layers"],
            cka=tuple(tuple(row) for row in data["cka"]),
            cosine=tuple(tuple(row) for row in data["cosine"]),
            num_updates=data["num_updates"],
            num_examples=data["num_examples"],
        )

    def adjacent(self) -> list[tuple[int, float]]:
        """(block index, CKA between its input and its output): high = the block barely changes the stream."""
        return [(i, self.cka[i][i + 1]) for i in range(self.num_layers)]


@dataclass(frozen=True)
class Analysis:
    policy: str
    family: str
    stacks: dict[str, StackAnalysis]
    structure: dict[str, Any]
    settings: dict[str, Any]
    calibration: dict[str, Any]
    seconds: float
    versions: dict[str, str] = field(default_factory=lambda: library_versions())

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "family": self.family,
            "stacks": {
                name: {
                    "num_layers": s.num_layers,
                    "cka": [list(row) for row in s.cka],
                    "cosine": [list(row) for row in s.cosine],
                    "adjacent": [{"block": i, "cka": v} for i, v in s.adjacent()],
                    "num_updates": s.num_updates,
                    "num_examples": s.num_examples,
                }
                for name, s in self.stacks.items()
            },
            "structure": self.structure,
            "settings": self.settings,
            "calibration": self.calibration,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
        }


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("vlaprune", "lerobot", "transformers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine_description(device: str | torch.device = "cpu") -> str:
    """The machine a measurement ran on, for results and tables: architecture, CPU cores, torch version
    and threads, and the GPU's name when ``device`` is a CUDA device."""
    text = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if str(device).startswith("cuda"):
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def compute_stack_cka(
    policy: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    family: Family | None = None,
    cka: CKAConfig | None = None,
    capture: CaptureConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, StackAnalysis]:
    """Stream calibration batches through ``policy`` and return a CKA matrix per stack.

    Each pass folds its residual states into one streaming accumulator per stack and drops them,
    so memory does not grow with the number of batches. The expert stacks see one update per flow
    timestep per batch. The noise of batch ``i`` is seeded by ``(capture.seed, i)``, so a batch gets
    the same noise whichever process runs it.

    Under ``torch.distributed`` (e.g. ``torchrun`` or ``accelerate launch``), rank r runs batches
    r, r + W, ... and the accumulators are summed across ranks before the matrices are computed:
    the result equals one process running every batch (exactly, when no token subsampling is used).
    """
    family = family or family_for(policy)
    cka = cka or CKAConfig()
    capture = capture or CaptureConfig()
    rank, world = _rank_and_world()
    depths = family.depths(policy)
    accumulators = {name: StreamingCKA(depth + 1, cka) for name, depth in depths.items()}
    cosines = {name: StreamingCosine(depth + 1) for name, depth in depths.items()}
    policy.eval()
    for index, batch in enumerate(batches):
        if index % world == rank:
            generator = torch.Generator().manual_seed(capture.seed * 1_000_003 + index)
            for recorded in collect_residuals(policy, family, batch, config=capture, generator=generator):
                accumulators[recorded.stack].update(recorded.states, recorded.mask)
                cosines[recorded.stack].update(recorded.states, recorded.mask)
                del recorded
        if on_batch is not None:
            on_batch(1)
    if world > 1:
        for acc in accumulators.values():
            acc.all_reduce()
        for cos in cosines.values():
            cos.all_reduce()
    results: dict[str, StackAnalysis] = {}
    for name, acc in accumulators.items():
        results[name] = StackAnalysis(
            name=name,
            num_layers=depths[name],
            cka=_as_tuples(acc.compute()),
            cosine=_as_tuples(cosines[name].compute()),
            num_updates=acc.num_updates,
            num_examples=acc.num_examples,
        )
    return results


def _as_tuples(matrix: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in matrix.cpu().tolist())


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def settings_dict(cka: CKAConfig, capture: CaptureConfig) -> dict[str, Any]:
    return {"cka": asdict(cka), "capture": {"timesteps": list(capture.timesteps), "seed": capture.seed}}


def analyze_policy(
    spec: str,
    policy: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    calibration: dict[str, Any],
    cka: CKAConfig,
    capture: CaptureConfig,
    on_batch: Callable[[int], None] | None = None,
) -> Analysis:
    family = family_for(policy)
    start = time.perf_counter()
    stacks = compute_stack_cka(policy, batches, family=family, cka=cka, capture=capture, on_batch=on_batch)
    return Analysis(
        policy=spec,
        family=family.name,
        stacks=stacks,
        structure=family.describe(policy),
        settings=settings_dict(cka, capture),
        calibration=calibration,
        seconds=time.perf_counter() - start,
    )


def run_analyze(cfg: AnalyzeConfig, *, on_batch: Callable[[int], None] | None = None) -> Analysis:
    """The ``vlaprune analyze`` entry point: load, calibrate, analyse, write ``cfg.out`` atomically."""
    from .calibration import calibration_batches, describe_calibration
    from .policies import is_builtin, load_policy
    from .report import write_analysis

    cfg.validate()
    assert cfg.policy.path and cfg.dataset.repo_id and cfg.out  # checked by validate()
    out = Path(cfg.out)
    prepare_output_dir(out, cfg.overwrite)  # fail before minutes of work, not after
    bundle = load_policy(cfg.policy.path, seed=cfg.policy.seed, device=cfg.policy.device)
    calib = cfg.calibration.calibration()
    batches = calibration_batches(
        bundle.policy,
        bundle.preprocessor,
        repo_id=cfg.dataset.repo_id,
        root=cfg.dataset.root,
        config=calib,
        allow_synthetic=is_builtin(cfg.policy.path),
        synthetic=bundle.synthetic,
    )
    calibration = describe_calibration(cfg.dataset.repo_id, cfg.dataset.root, calib)
    analysis = analyze_policy(
        cfg.policy.path,
        bundle.policy,
        batches,
        calibration=calibration,
        cka=cfg.cka.config(),
        capture=cfg.calibration.capture(),
        on_batch=on_batch,
    )
    if _rank_and_world()[0] == 0:  # under torch.distributed every rank holds the same result
        write_atomically(out, cfg.overwrite, lambda tmp: write_analysis(analysis, tmp))
        logger.info("wrote %s", out)
    return analysis
