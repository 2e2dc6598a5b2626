"""Processors of ``smolvla_connector``: the stock SmolVLA ones (the type changes only what trains)."""

from __future__ import annotations

from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

make_smolvla_connector_pre_post_processors = make_smolvla_pre_post_processors

__all__ = ["make_smolvla_connector_pre_post_processors"]
