"""``vlaprune bench``: time a full policy and its pruned version side by side (see
:mod:`vlaprune.core.timing` for what is measured and how the ceiling is found)."""

from __future__ import annotations

import gc
import resource
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vlaprune.core.family import Family, resolve
from vlaprune.core.surgery import remove_blocks, removed_blocks
from vlaprune.core.timing import action_chunk_latency, compare, is_out_of_memory, train_step
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig, calibration_batches
from vlaprune.io.manifest import read_manifest
from vlaprune.io.provenance import library_versions, machine_description
from vlaprune.models.loading import is_builtin, load_policy
from vlaprune.pipelines.planning import build_problem, choose_plan, compute_stack_cka, planned_stacks


def set_cameras(policies: Sequence[Any], count: int | None = None, size: int | None = None) -> None:
    """Give the policies ``count`` cameras (the first camera's feature, copied under new keys) and
    frames of ``size`` × ``size`` pixels; ``None`` leaves that as it is.

    The vision encoder is shared across cameras in SmolVLA and pi0, so this scales the prefix the way
    a real multi-camera robot does; synthetic frames then carry every camera. The policies resize
    frames to their own input resolution (SmolVLA: 512 × 512 with padding, pi0: 224 × 224), so the
    frame size changes the resize and preprocessing cost, not the token count.
    """
    import copy

    for policy in policies:
        features = dict(policy.config.input_features)
        cams = [k for k in features if k.startswith("observation.images.")]
        if not cams:
            raise ValueError(f"{policy.config.type} has no camera feature to copy")
        if count is not None:
            for key in cams[count:]:
                del features[key]
            for i in range(len(cams), count):
                features[f"observation.images.extra{i}"] = copy.deepcopy(features[cams[0]])
        if size is not None:
            for key in [k for k in features if k.startswith("observation.images.")]:
                channels = features[key].shape[0]
                features[key] = replace(features[key], shape=(channels, size, size))
        policy.config.input_features = features


def set_trainable(policy: Any, family: Family, which: str) -> None:
    """``default``: as the policy's config built it; ``expert``: everything but the family's VLM
    backbone (LeRobot's ``train_expert_only``); ``all``: every parameter."""
    if which == "default":
        return
    if which not in ("expert", "all"):
        raise ValueError(f"trainable set {which!r}: choose default, expert or all")
    policy.requires_grad_(True)
    if which == "expert":
        if not family.backbone:
            raise ValueError(f"family {family.name} names no backbone: cannot train its expert only")
        for path in family.backbone:
            resolve(policy, path).requires_grad_(False)


def check_fits(
    policy: Any, observation: dict[str, Any], train_batch: dict[str, Any] | None,
    make_batch: Callable[[int], dict[str, Any]],
) -> None:
    """Run one chunk and one training step of the full policy; on out-of-memory, find by halving the
    training batch size that fits and say so, instead of failing with an allocator trace."""
    try:
        action_chunk_latency(policy, observation)
    except Exception as err:
        if is_out_of_memory(err):
            raise ValueError(f"one action chunk at --batch_size={len(observation['task'])} does not fit in "
                             "memory; use --batch_size=1 or --dtype=bfloat16") from err
        raise
    if train_batch is None:
        return
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    size = len(train_batch["task"])
    batch = train_batch
    while True:
        try:
            train_step(policy, batch, optimizer)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size == 1:
                raise ValueError("a training step does not fit in memory even at batch 1; try --dtype=bfloat16 "
                                 "or --train_batch_size=0 (inference only)") from err
            size //= 2
            batch = make_batch(size)
            continue
        if size != len(train_batch["task"]):
            raise ValueError(f"a training step at --train_batch_size={len(train_batch['task'])} does not fit in "
                             f"memory; --train_batch_size={size} fits")
        return


def run_bench(cfg: Any, *, on_round: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``vlaprune bench`` entry point (``cfg`` is a :class:`vlaprune.pipelines.config.BenchConfig`)."""


    cfg.validate()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    bundle = load_policy(cfg.policy.path, seed=cfg.policy.seed, device=cfg.policy.device)
    full = bundle.policy
    family = family_for(full)

    def batches(num: int, seed: int) -> list[dict[str, Any]]:
        return list(calibration_batches(full, bundle.preprocessor, repo_id=cfg.dataset.repo_id,
                                        root=cfg.dataset.root, config=CalibrationConfig(num, num, seed),
                                        allow_synthetic=is_builtin(cfg.policy.path),
                                        synthetic=bundle.synthetic))

    if cfg.pruned.path:
        manifest = read_manifest(Path(cfg.pruned.path))
        if manifest is None:
            raise ValueError(f"{cfg.pruned.path} has no prune_manifest.json: cannot tell which blocks it removed")
        pruned = load_policy(cfg.pruned.path, device=cfg.policy.device).policy
        if family_for(pruned) is not family:
            raise ValueError(f"{cfg.pruned.path} is a {family_for(pruned).name} policy, {cfg.policy.path} a "
                             f"{family.name} one: compare a policy with its own pruned checkpoint")
        depths = family.depths(full)
        for name, depth in manifest.source_depths().items():
            if depth != depths[name]:
                raise ValueError(f"{cfg.pruned.path} was pruned from a {depth}-block {name} stack; "
                                 f"{cfg.policy.path} has {depths[name]}")
        kept = manifest.kept()
        method = manifest.method
    else:
        stacks = compute_stack_cka(full, batches(cfg.calibration.num_samples, cfg.calibration.seed),
                                   family=family, cka=cfg.cka.config(), capture=cfg.calibration.capture())
        problem = build_problem(family, full, stacks, cfg.plan.protect, cfg.plan.allow,
                                planned_stacks(family, cfg.plan))
        # timing needs the requested method's plan as is: no refine
        plan, _ = choose_plan(replace(cfg.plan, refine="off"), problem, lambda p: float("nan"))
        kept = family.complete(full, plan.kept)
        method = plan.method
    full.to(dtype=dtype)
    if cfg.pruned.path:
        pruned.to(dtype=dtype)
    else:  # a view on the full policy's weights: one copy in memory (real pi0: 16 GB in float32)
        pruned = remove_blocks(full, family, kept, share_weights=True)
    for pol in (full, pruned):
        set_trainable(pol, family, cfg.trainable)
    if cfg.cameras is not None or cfg.image_size is not None:
        set_cameras([full, pruned], cfg.cameras, cfg.image_size)
    observation = {k: v for k, v in batches(cfg.batch_size, 1)[0].items() if not k.startswith("action")}
    train_batch = batches(cfg.train_batch_size, 2)[0] if cfg.train_batch_size else None
    check_fits(full, observation, train_batch, lambda n: batches(n, 2)[0])
    cameras = getattr(full.config, "image_features", {})  # GR00T N1.5's inputs are not LeRobot features
    result = compare(full, pruned, family, removed_blocks(family, full, kept), train_batch, observation,
                     rounds=cfg.rounds, warmup=cfg.warmup, on_round=on_round)
    result.update({
        "policy": cfg.policy.path, "pruned_path": cfg.pruned.path, "method": method, "kept": kept,
        "dtype": cfg.dtype, "batch_size": cfg.batch_size, "cameras": len(cameras),
        "image_size": [list(f.shape)[1:] for f in cameras.values()],
        "shared_weights": not cfg.pruned.path,
        "train_batch_size": cfg.train_batch_size,
        "trainable_set": cfg.trainable,
        "machine": machine_description(result["device"]),
        "versions": library_versions(),
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    })
    return result
