"""The vision encoder SmolVLA and pi0 / pi0.5 share: a SigLIP tower of Hugging Face encoder layers."""

from __future__ import annotations

from vlaprune.core.family import StackSpec


def vision_stack(tower: str, description: str) -> StackSpec:
    """The opt-in ``vision`` stack of the SigLIP tower at ``tower`` (a dotted path from the policy).

    Each layer reads the residual stream in ``layer_norm1`` and adds ``self_attn.out_proj`` and ``mlp``
    to it; ``post_layernorm`` takes the last layer's output, and the connector reads only that. The
    tower runs once per camera image, and its layers carry no index, so any of them may go.
    """
    return StackSpec("vision", f"{tower}.encoder.layers", f"{tower}.post_layernorm", input_norm="layer_norm1",
                     residual_branches=("self_attn.out_proj", "mlp"), per_image=True, opt_in=True,
                     description=description)
