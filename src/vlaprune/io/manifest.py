"""Pruned checkpoints: a LeRobot policy directory plus ``prune_manifest.json``.

The directory is what ``lerobot-train --policy.path=DIR`` and ``lerobot-eval`` expect: ``config.json``
(a stock type where the family's config can express the plan, else a type registered by the
``lerobot_policy_vlaprune`` plugin), ``model.safetensors``, and the source's processor pipelines
(pruning does not change them). The manifest says what was done, with original indices, so a
pruned checkpoint can be audited, reproduced and refused when its weights disagree with it.
GR00T N1.5 is the exception: its checkpoint is the Isaac-GR00T layout (``config.json`` with the
pruned depths, ``model.safetensors``; no LeRobot processors), plus the same manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlaprune.core.family import Family
from vlaprune.io.outputs import write_atomically

logger = logging.getLogger(__name__)

MANIFEST = "prune_manifest.json"
MANIFEST_FORMAT = 1


def save_pruned(pruned: Any, bundle: Any, manifest: Mapping[str, Any], out: Path, *, overwrite: bool = False) -> Path:
    """Write the pruned policy, the source's processors (``bundle``) and the manifest to ``out`` atomically."""

    def write(directory: Path) -> None:
        pruned.save_pretrained(directory)
        for processor in (bundle.preprocessor, bundle.postprocessor):
            if processor is not None:  # GR00T N1.5 (Isaac-GR00T layout) has no LeRobot processors
                processor.save_pretrained(directory)
        (directory / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2) + "\n")

    write_atomically(out, overwrite, write)
    logger.info("wrote pruned checkpoint %s", out)
    return out


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: manifest format {data.get('format')!r} is not {MANIFEST_FORMAT}; upgrade vlaprune")
    return data


def check_manifest(policy: Any, family: Family, manifest: Mapping[str, Any], directory: Path) -> None:
    """The loaded policy's depth per stack must be what the manifest says was kept."""
    if manifest.get("family") != family.name:
        raise ValueError(
            f"{directory}: manifest family {manifest.get('family')!r} but the config builds {family.name!r}"
        )
    depths = family.depths(policy)
    for name, entry in manifest["stacks"].items():
        if name not in depths:
            raise ValueError(f"{directory}: manifest names stack {name!r}, the policy has {sorted(depths)}")
        if len(entry["kept"]) != depths[name]:
            raise ValueError(
                f"{directory}: manifest keeps {len(entry['kept'])} {name} blocks but the checkpoint has "
                f"{depths[name]}: the weights do not belong to this manifest"
            )


def original_indices(source_manifest: Mapping[str, Any] | None, kept: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Kept indices of a (possibly already pruned) source, mapped to the ORIGINAL model's indices."""
    if source_manifest is None:
        return {name: list(idx) for name, idx in kept.items()}
    return {name: [source_manifest["stacks"][name]["kept_original"][i] for i in idx] for name, idx in kept.items()}
