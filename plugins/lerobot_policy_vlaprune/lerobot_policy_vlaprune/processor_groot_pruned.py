"""Processors of ``groot_pruned``: the stock GR00T ones (pruning changes no input or output).

Checkpoints bring their own processor JSONs, which LeRobot loads through its GR00T path
(``GrootPrunedConfig`` is a ``GrootConfig``); this factory serves a config alone.
"""

from __future__ import annotations

from lerobot.policies.groot.processor_groot import make_groot_pre_post_processors

make_groot_pruned_pre_post_processors = make_groot_pre_post_processors

__all__ = ["make_groot_pruned_pre_post_processors"]
