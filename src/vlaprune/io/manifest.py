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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vlaprune.core.family import Family
from vlaprune.io.outputs import write_atomically

logger = logging.getLogger(__name__)

MANIFEST = "prune_manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class StackRecord:
    """What one stack lost. ``kept`` / ``removed`` index the blocks of the policy that was pruned (the
    source); ``kept_original`` the blocks of the ORIGINAL model (they differ when the source was
    itself a pruned checkpoint)."""

    kept: tuple[int, ...]
    removed: tuple[int, ...]
    source_num_layers: int
    kept_original: tuple[int, ...]

    def __post_init__(self) -> None:
        if sorted((*self.kept, *self.removed)) != list(range(self.source_num_layers)):
            raise ValueError(f"kept {list(self.kept)} and removed {list(self.removed)} do not split "
                             f"range({self.source_num_layers})")
        if len(self.kept_original) != len(self.kept):
            raise ValueError(f"kept_original {list(self.kept_original)} does not match kept {list(self.kept)}")

    def to_json(self) -> dict[str, Any]:
        return {"kept": list(self.kept), "removed": list(self.removed), "source_num_layers": self.source_num_layers,
                "kept_original": list(self.kept_original)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackRecord:
        _check_keys("stack record", data, {f.name for f in fields(cls)})
        return cls(kept=tuple(data["kept"]), removed=tuple(data["removed"]),
                   source_num_layers=int(data["source_num_layers"]), kept_original=tuple(data["kept_original"]))


@dataclass(frozen=True)
class Manifest:
    """The record of one ``vlaprune prune`` run, saved as ``prune_manifest.json`` in the checkpoint."""

    family: str
    policy_type: str  # the pruned checkpoint's config type
    source: str  # what ``--policy.path`` named
    method: str  # the plan applied ("manual" for --plan.kept)
    requested_method: str
    stacks: Mapping[str, StackRecord]
    plan: Mapping[str, Any]  # the applied plan (Plan.to_json)
    candidates: Sequence[Mapping[str, Any]]  # every plan weighed, with cost and measured damage
    verify: Mapping[str, float]  # VerifyReport.to_json
    parameters: Mapping[str, Mapping[str, int]]  # {"source": counts, "pruned": counts}
    chunk_linear_flops: Mapping[str, float]  # source, pruned, predicted_time_ratio
    calibration: Mapping[str, Any]
    settings: Mapping[str, Any]
    versions: Mapping[str, str]
    format: int = field(default=MANIFEST_FORMAT)

    def kept(self) -> dict[str, list[int]]:
        """Per stack, the kept blocks as indices of the source policy."""
        return {name: list(stack.kept) for name, stack in self.stacks.items()}

    def source_depths(self) -> dict[str, int]:
        return {name: stack.source_num_layers for name, stack in self.stacks.items()}

    def removed_nothing(self) -> bool:
        return not any(stack.removed for stack in self.stacks.values())

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["stacks"] = {name: stack.to_json() for name, stack in self.stacks.items()}
        data["candidates"] = list(self.candidates)
        return {"format": self.format, **{k: v for k, v in data.items() if k != "format"}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        """The manifest in ``data``; an unknown format, a missing or an unknown key raises, naming it."""
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{where}: manifest format {data.get('format')!r} is not {MANIFEST_FORMAT}; "
                             "upgrade vlaprune")
        _check_keys(where, data, {f.name for f in fields(cls)})
        values = dict(data)
        values["stacks"] = {name: StackRecord.from_json(s) for name, s in data["stacks"].items()}
        values["candidates"] = tuple(data["candidates"])
        return cls(**values)


def _check_keys(where: str, data: Mapping[str, Any], expected: set[str]) -> None:
    missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
    if missing or unknown:
        raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def save_pruned(pruned: Any, bundle: Any, manifest: Manifest, out: Path, *, overwrite: bool = False) -> Path:
    """Write the pruned policy, the source's processors (``bundle``) and the manifest to ``out`` atomically."""

    def write(directory: Path) -> None:
        pruned.save_pretrained(directory)
        for processor in (bundle.preprocessor, bundle.postprocessor):
            if processor is not None:  # GR00T N1.5 (Isaac-GR00T layout) has no LeRobot processors
                processor.save_pretrained(directory)
        (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")

    write_atomically(out, overwrite, write)
    logger.info("wrote pruned checkpoint %s", out)
    return out


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of a checkpoint directory, or None when it has none (an unpruned checkpoint)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_json(json.loads(path.read_text()), str(path))


def check_manifest(policy: Any, family: Family, manifest: Manifest, directory: Path) -> None:
    """The loaded policy's depth per stack must be what the manifest says was kept."""
    if manifest.family != family.name:
        raise ValueError(f"{directory}: manifest family {manifest.family!r} but the config builds {family.name!r}")
    depths = family.depths(policy)
    for name, stack in manifest.stacks.items():
        if name not in depths:
            raise ValueError(f"{directory}: manifest names stack {name!r}, the policy has {sorted(depths)}")
        if len(stack.kept) != depths[name]:
            raise ValueError(
                f"{directory}: manifest keeps {len(stack.kept)} {name} blocks but the checkpoint has "
                f"{depths[name]}: the weights do not belong to this manifest"
            )


def original_indices(source_manifest: Manifest | None, kept: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Kept indices of a (possibly already pruned) source, mapped to the ORIGINAL model's indices."""
    if source_manifest is None:
        return {name: list(idx) for name, idx in kept.items()}
    stacks = source_manifest.stacks  # a stack the source's manifest does not name was not pruned (opt-in)
    return {name: [stacks[name].kept_original[i] for i in idx] if name in stacks else list(idx)
            for name, idx in kept.items()}
