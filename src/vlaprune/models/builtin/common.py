"""Shared pieces of the built-in offline policies (``tiny:*`` and ``real:*``).

Built-in policies exist so that tests, the demo and the speed benchmarks run with no download:
their VLM configs, tokenizers and processors are generated into a local cache directory, their
weights are seeded. ``tiny`` variants are small and their weights are perturbed away from the
initial values (an identity-like init makes equivalence tests pass for the wrong reason);
``real`` variants have the real architectures' shapes and random weights (enough for timing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Feature layout shared by every built-in policy: one camera, a 6-d state and a 6-d action.
CAMERA_KEY = "observation.images.top"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
STATE_DIM = 6
ACTION_DIM = 6

# Vocabulary of the generated word-level tokenizers: words of robot task instructions
# (every MetaWorld task description included).
_INSTRUCTION_TEXT = """
a an the and or of to into onto on off in out up down from with by using at under over above below
behind front left right top bottom side middle center near far next between inside outside around
back forward sideways clockwise counterclockwise degrees slowly quickly gently then while until
pick place put push pull press open close turn rotate rotating revolving slide lift drop grasp grab
hold release move reach stack insert remove take get kick dunk sweep unplug plug lock unlock stir
pour wipe fold hang fill empty flip set bring go stop bypass cover uncover
cube block box ball basketball soccer puck peg nut screw hole bin basket cup mug bottle can plate
bowl spoon fork knife pan pot lid drawer door window cabinet shelf table counter wall goal handle
lever button dial faucet tap hammer stick coffee machine gripper joint position towel cloth sponge
book pen marker toy apple banana orange lemon carrot bread fridge microwave oven sink stove tray
red green blue yellow black white orange purple pink brown gray small big large long short tall
first second third last one two three another other this that it its all both each
is are be please can you robot arm task
"""
INSTRUCTION_WORDS: list[str] = _INSTRUCTION_TEXT.split()
DIGITS = list("0123456789")  # one token each, as Gemma and SmolLM split numbers
PUNCTUATION = list(".,;:!?'\"-()/")


def word_vocabulary(leading: list[str], extra: list[str] | None = None) -> list[str]:
    """Token strings in id order for the generated word-level tokenizers: ``leading`` (special
    tokens), the instruction words, ``extra`` words, digits and punctuation, without repeats."""
    return list(dict.fromkeys([*leading, *INSTRUCTION_WORDS, *(extra or []), *DIGITS, *PUNCTUATION]))


@dataclass
class PolicyBundle:
    """A LeRobot policy with the processors that feed it (built-in or loaded from a checkpoint)."""

    spec: str  # e.g. "tiny:smolvla"
    policy: Any  # lerobot PreTrainedPolicy, eval mode, float32, CPU
    preprocessor: Any  # lerobot PolicyProcessorPipeline (raw batch -> model batch); None: batches are model inputs
    postprocessor: Any  # lerobot PolicyProcessorPipeline (model action -> raw action), or None
    # seeded synthetic calibration batches, for policies whose inputs are not LeRobot features (GR00T N1.5)
    synthetic: Callable[[Any], Iterator[dict[str, Any]]] | None = None








@torch.no_grad()
def perturb_parameters(module: nn.Module, *, seed: int, scale: float = 0.02) -> None:
    """Add seeded Gaussian noise, relative to each tensor's scale, to every floating parameter.

    Norm weights initialised to exactly 1 (or 0 for Gemma's ``1 + w`` norms) and zero biases would
    otherwise make blocks look alike for the wrong reason.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if not param.dtype.is_floating_point:
            continue
        ref = param.detach().float().std() if param.numel() > 1 else param.detach().float().abs()
        std = float(ref) if float(ref) > 0 else 1.0
        noise = torch.randn(param.shape, generator=gen) * (scale * std + scale)
        param.add_(noise.to(param.dtype))


@torch.no_grad()
def spread_linear_weights(module: nn.Module, *, seed: int) -> None:
    """Redraw every ``nn.Linear`` weight from N(0, 1/fan_in) (LeCun normal), seeded.

    Transformer inits (std 0.02) leave a tiny model's blocks adding almost nothing to a residual
    stream scaled up by sqrt(width) embeddings: every block would look redundant (CKA ≈ 1) and
    equivalence tests could not tell a kept block from a skipped one. Unit-gain weights make each
    block change the stream, so analysis and surgery tests mean something.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, sub in sorted(module.named_modules(), key=lambda kv: kv[0]):
        if isinstance(sub, nn.Linear):
            fan_in = sub.weight.shape[1]
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) / fan_in**0.5)


def synthetic_dataset_stats(features: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Normalisation statistics for synthetic data: images in [0, 1], state/action standard normal."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, feat in features.items():
        shape = tuple(feat.shape)
        if key.startswith("observation.images."):
            c = shape[0]
            stats[key] = {
                "mean": torch.full((c, 1, 1), 0.5),
                "std": torch.full((c, 1, 1), 0.29),
                "min": torch.zeros((c, 1, 1)),
                "max": torch.ones((c, 1, 1)),
            }
        else:
            stats[key] = {
                "mean": torch.zeros(shape),
                "std": torch.ones(shape),
                "min": torch.full(shape, -3.0),
                "max": torch.full(shape, 3.0),
                "q01": torch.full(shape, -2.3),
                "q99": torch.full(shape, 2.3),
            }
    return stats


def check_tensors(what: str, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *,
                  extra_allowed: bool = False) -> None:
    """ValueError naming the first missing or reshaped tensor of ``state`` against ``expected`` shapes,
    and the unexpected ones unless ``extra_allowed``; ``what`` says whose tensors (and from which file)."""
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{what}: tensor {name!r} is missing")
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected and not extra_allowed:
        raise ValueError(f"{what}: unexpected tensors {unexpected[:5]}")
