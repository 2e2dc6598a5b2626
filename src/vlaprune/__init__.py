"""vlaprune: training-free, CKA-guided depth pruning of Vision-Language-Action policies.

``vlaprune.load_policy`` is the one name at the top; the layers below (``core``, ``io``,
``families``, ``models``, ``pipelines``, ``studies``) are imported on first use, so importing a
low layer such as ``vlaprune.core.cka`` does not pull in LeRobot.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_policy"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_policy":
        from vlaprune.models.loading import load_policy

        return load_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
