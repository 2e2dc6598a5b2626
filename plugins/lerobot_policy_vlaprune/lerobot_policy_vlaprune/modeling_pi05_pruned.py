"""``PI05PrunedPolicy``: LeRobot's ``PI05Policy`` with both Gemma stacks cut to the kept layers.

Construction builds the stock structure (under vlaprune's tiny architecture when the config says so)
and cuts both stacks to K layers numbered 0..K-1; ``from_pretrained`` then loads the checkpoint
strictly (see ``_pruned``). Training, ``select_action`` and processors are the stock pi0.5 ones.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

from lerobot.policies.pi05.modeling_pi05 import PI05Policy

from ._pruned import architecture, cut_stacks, load_pretrained_strict
from .configuration_pi05_pruned import PI05PrunedConfig


class PI05PrunedPolicy(PI05Policy):
    """A depth-pruned pi0.5: ``config.kept_layers`` (original indices) held as layers 0..K-1 of both stacks."""

    config_class = PI05PrunedConfig
    name = "pi05_pruned"

    def __init__(self, config: PI05PrunedConfig, **kwargs: Any) -> None:
        with architecture(config, "pi05"):
            super().__init__(config, **kwargs)
        cut_stacks(self, config)

    @classmethod
    def from_pretrained(
        cls: builtins.type[PI05PrunedPolicy],
        pretrained_name_or_path: str | Path,
        *,
        config: Any | None = None,
        force_download: bool = False,
        resume_download: bool | None = None,
        proxies: dict[str, Any] | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> PI05PrunedPolicy:
        """Load a ``pi05_pruned`` checkpoint; any missing, unexpected or reshaped tensor raises."""
        return load_pretrained_strict(
            cls, pretrained_name_or_path, config=config, force_download=force_download,
            resume_download=resume_download, proxies=proxies, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, revision=revision, strict=strict, **kwargs,
        )
