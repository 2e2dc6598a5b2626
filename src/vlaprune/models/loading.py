"""``load_policy(spec)``: a LeRobot policy and its processors from a built-in name, a local
checkpoint directory or a hub id, never with silently random weights."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from lerobot_policy_vlaprune.checks import check_finite, check_weights
from vlaprune.families import family_for, isaac_n15
from vlaprune.io.manifest import check_manifest, read_manifest
from vlaprune.models import shipped
from vlaprune.models.builtin.common import PolicyBundle

logger = logging.getLogger(__name__)

BUILTIN_SPECS = ("tiny:smolvla", "tiny:pi0", "tiny:pi05", "tiny:groot", "tiny:groot_n15", "real:smolvla",
                 "real:pi0", "real:pi05", "real:groot", "pretrained:smolvla")
TRAINED_SPECS = tuple(shipped.MODELS)  # trained weights that come with vlaprune


def is_builtin(spec: str) -> bool:
    return spec.split(":", 1)[0] in ("tiny", "real", "pretrained") and ":" in spec


def load_policy(spec: str, *, seed: int = 0, device: str = "cpu") -> PolicyBundle:
    """Load ``spec``: ``tiny:<family>`` / ``real:<family>`` / ``pretrained:smolvla`` (built offline,
    seeded random weights where not pretrained), ``metaworld:smolvla`` / ``metaworld:smolvla-small``
    (the shipped trained models), a local LeRobot checkpoint directory, or a hub repo id (downloaded by
    LeRobot; not possible offline)."""
    if is_builtin(spec):
        bundle = _build_builtin(spec, seed=seed)
    elif spec in TRAINED_SPECS:
        bundle = replace(_load_pretrained(str(shipped.policy_dir(spec)), local=True), spec=spec)
    elif Path(spec).exists():
        bundle = _load_n15(spec) if isaac_n15.is_n15_checkpoint(spec) else _load_pretrained(spec, local=True)
    elif Path(spec).is_absolute() or spec.startswith((".", "~")) or spec.count("/") != 1:
        raise FileNotFoundError(
            f"policy {spec!r}: no such directory. Give a LeRobot checkpoint directory "
            f"(with config.json and model.safetensors), a hub id 'user/name', or one of "
            f"{', '.join(BUILTIN_SPECS + TRAINED_SPECS)}"
        )
    else:
        bundle = _load_pretrained(spec, local=False)
    bundle.policy.to(device)
    bundle.policy.eval()
    return bundle


def _build_builtin(spec: str, *, seed: int) -> PolicyBundle:
    size, name = spec.split(":", 1)
    if spec not in BUILTIN_SPECS:
        raise ValueError(f"unknown built-in policy {spec!r}; built-in policies: {', '.join(BUILTIN_SPECS)}")
    if name == "smolvla":
        from vlaprune.models.builtin import smolvla

        return smolvla.build(size, seed=seed)  # type: ignore[arg-type]
    if name == "groot":
        from vlaprune.models.builtin import groot

        return groot.build(size, seed=seed)  # type: ignore[arg-type]
    if name == "groot_n15":
        from vlaprune.models.builtin import groot_n15

        return groot_n15.build(size, seed=seed)
    from vlaprune.models.builtin import pi0

    return pi0.build(name, size, seed=seed)  # type: ignore[arg-type]


def _load_pretrained(path: str, *, local: bool) -> PolicyBundle:
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    config = PreTrainedConfig.from_pretrained(path)
    family_for(config.type)  # unsupported types fail here, listing the supported ones
    policy = get_policy_class(config.type).from_pretrained(path, config=config)
    if local:
        check_weights(policy, Path(path) / "model.safetensors")
    _check_loaded(policy, path, local=local)
    preprocessor, postprocessor = make_pre_post_processors(config, pretrained_path=path)
    return PolicyBundle(spec=path, policy=policy, preprocessor=preprocessor, postprocessor=postprocessor)


def _load_n15(path: str) -> PolicyBundle:
    """An Isaac-GR00T N1.5 checkpoint directory, loaded strictly with LeRobot 0.5.1's N1.5 code."""
    policy = isaac_n15.N15Policy(isaac_n15.load_checkpoint(path))
    _check_loaded(policy, path, local=True)
    return PolicyBundle(spec=path, policy=policy, preprocessor=None, postprocessor=None)


def _check_loaded(policy: Any, path: str, *, local: bool) -> None:
    """Refuse weights holding NaN or Inf, naming the tensor, and a pruned checkpoint whose depths disagree
    with its manifest."""
    check_finite(policy, path)
    manifest = read_manifest(Path(path)) if local else None
    if manifest is not None:
        check_manifest(policy, family_for(policy), manifest, Path(path))
