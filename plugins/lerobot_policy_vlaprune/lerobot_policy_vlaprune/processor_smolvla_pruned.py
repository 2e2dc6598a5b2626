"""Processors of ``smolvla_pruned``: the stock SmolVLA ones (pruning changes no input or output)."""

from __future__ import annotations

from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

make_smolvla_pruned_pre_post_processors = make_smolvla_pre_post_processors

__all__ = ["make_smolvla_pruned_pre_post_processors"]
