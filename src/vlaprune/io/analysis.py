"""The result of an analysis: per stack, CKA and cosine matrices between the L+1 residual states,
with the settings and calibration that produced them; ``analysis.json`` is its JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlaprune.io.provenance import library_versions


@dataclass(frozen=True)
class StackAnalysis:
    """CKA between the L+1 residual states of one stack (index 0 = stack input, i = output of block i-1)."""

    name: str
    num_layers: int
    cka: tuple[tuple[float, ...], ...]
    cosine: tuple[tuple[float, ...], ...]  # mean token-wise cosine between the same states
    num_updates: int
    num_examples: int
    # per state, the share of variance on the first principal direction (first calibration batch)
    top_direction: tuple[float, ...] | None = None

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
            top_direction=tuple(data["top_direction"]) if data.get("top_direction") is not None else None,
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
                    "top_direction": None if s.top_direction is None else list(s.top_direction),
                }
                for name, s in self.stacks.items()
            },
            "structure": self.structure,
            "settings": self.settings,
            "calibration": self.calibration,
            "seconds": round(self.seconds, 3),
            "versions": self.versions,
        }
