"""Processors of ``pi0_pruned``: the stock pi0 ones (pruning changes no input or output).

LeRobot resolves ``make_<type>_pre_post_processors`` in the ``processor_*`` sibling of the config
module when it builds processors from a config alone (checkpoints bring their own processor JSONs).
"""

from __future__ import annotations

from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors

make_pi0_pruned_pre_post_processors = make_pi0_pre_post_processors

__all__ = ["make_pi0_pruned_pre_post_processors"]
