"""``vlaprune analyze``: one calibration pass, a CKA matrix per stack, written as JSON and heatmaps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from vlaprune.core.capture import CaptureConfig
from vlaprune.core.cka import CKAConfig
from vlaprune.families import family_for
from vlaprune.io.analysis import Analysis
from vlaprune.io.calibration import calibration_batches, describe_calibration
from vlaprune.io.outputs import prepare_output_dir, write_atomically
from vlaprune.io.report import write_analysis
from vlaprune.models.loading import is_builtin, load_policy
from vlaprune.pipelines.config import AnalyzeConfig
from vlaprune.pipelines.planning import compute_stack_cka, rank_and_world, settings_dict, warn_degenerate

logger = logging.getLogger(__name__)


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
    warn_degenerate(stacks, cka)
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
    if rank_and_world()[0] == 0:  # under torch.distributed every rank holds the same result
        write_atomically(out, cfg.overwrite, lambda tmp: write_analysis(analysis, tmp))
        logger.info("wrote %s", out)
    return analysis
