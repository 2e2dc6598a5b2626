"""Shared by every pruned type: a pruned config made from its source's, construction and strict loading.

pi0 and pi0.5 take their depth from ``get_gemma_config`` (18 layers, not a config field), so a pruned
policy is built as the stock structure at the recorded dimensions (:mod:`.pi_architecture`) and then
cut: both stacks keep their first K modules, which were constructed with ``self_attn.layer_idx`` =
0..K-1 (exactly the renumbering the KV cache needs: expert layer i reads the cache slot of VLM layer
i), and ``num_hidden_layers`` = K is set on every HF config that holds the depth
(``PiGemmaModel.forward`` runs ``layers[:config.num_hidden_layers]``). The caller then loads the kept
weights, renumbered 0..K-1.

Loading is strict: LeRobot's ``PI0Policy.from_pretrained`` prints a warning and returns the policy
with random layers when the state dict does not fit; here any missing, unexpected or reshaped tensor,
or a non-finite one, raises :class:`~.checks.PrunedCheckpointError`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .checks import check_finite, check_kept_list, check_weights, get_path
from .pi_architecture import EXPERT_MODEL, VLM_MODEL, build_architecture, check_architecture

logger = logging.getLogger(__name__)

STACK_MODELS = (VLM_MODEL, EXPERT_MODEL)
SAFETENSORS_FILE = "model.safetensors"


def config_as[C](target: type[C], source: Any, **fields: Any) -> C:
    """A ``target`` config (a pruned or training-time type) holding every field of the ``source`` config,
    deep-copied, and ``fields`` (kept blocks, source depths, ...) on top."""
    source_fields = dataclasses.fields(source)
    values = {f.name: copy.deepcopy(getattr(source, f.name)) for f in source_fields
              if f.init and f.name not in fields}
    config = target(**values, **fields)
    for f in source_fields:  # fields not set by __init__, if any
        if not f.init and f.name not in fields:
            setattr(config, f.name, copy.deepcopy(getattr(source, f.name)))
    return config


def validate_pi_fields(config: Any) -> None:
    """Check ``kept_layers``, ``source_num_layers``, ``architecture`` and ``vocab_size`` of a pruned pi0 /
    pi0.5 config.

    Called from the configs' ``__post_init__`` so a bad ``config.json`` or command-line override fails
    at parse time, naming the field and the fix, instead of building a wrong model.
    """
    name = type(config).__name__
    config.kept_layers = check_kept_list(f"{name}.kept_layers", config.kept_layers,
                                         f"{name}.source_num_layers", config.source_num_layers)
    check_architecture(name, config.architecture, config.vocab_size)


def cut_stacks(policy: nn.Module, config: Any) -> None:
    """Keep the first ``K = len(config.kept_layers)`` layers of both stacks; set the depth to K.

    Freshly built layers carry ``self_attn.layer_idx`` = their position, so the survivors are already
    numbered 0..K-1. Every HF config object that stores the depth is updated (the PaliGemma config's
    ``text_config`` is the language model's config; the expert's ``GemmaForCausalLM`` shares its
    config with its inner model), and nothing else in LeRobot 0.6.1 sizes anything by depth (the KV
    cache is a ``DynamicCache`` that grows per layer index).
    """
    keep = len(config.kept_layers)
    for path in STACK_MODELS:
        model = get_path(policy, path)
        layers = model.layers
        if len(layers) != config.source_num_layers:
            raise ValueError(f"{type(config).__name__}.source_num_layers={config.source_num_layers}, but "
                             f"{len(layers)} layers were built at {path}")
        del layers[keep:]
        for new_idx, layer in enumerate(layers):
            assert layer.self_attn.layer_idx == new_idx, (path, new_idx, layer.self_attn.layer_idx)
    pwe = get_path(policy, "model.paligemma_with_expert")
    configs = [
        pwe.paligemma.config.text_config,
        pwe.paligemma.model.config.text_config,
        get_path(policy, VLM_MODEL).config,
        pwe.gemma_expert.config,
        get_path(policy, EXPERT_MODEL).config,
    ]
    for hf_config in {id(c): c for c in configs}.values():
        hf_config.num_hidden_layers = keep


def load_pretrained_strict[P: nn.Module](
    cls: type[P],
    pretrained_name_or_path: str | Path,
    *,
    config: Any | None,
    force_download: bool,
    resume_download: bool | None,
    proxies: dict[str, Any] | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
    revision: str | None,
    strict: bool,
    **kwargs: Any,
) -> P:
    """``cls.from_pretrained``: build the pruned policy from its config, then load every tensor exactly.

    The safetensors file is loaded as written, with no key fixing: LeRobot's
    ``_fix_pytorch_state_dict_keys`` adapts checkpoints converted from openpi (unprefixed keys,
    ``time_mlp_*`` names, embeddings tied to ``lm_head``), while pruned checkpoints are written by
    ``save_pretrained`` with the policy's exact keys, so a plain round trip is already exact. (Its
    ``lm_head`` → embeddings copy is a no-op on such files only because the file's own embedding
    tensor comes later in sorted key order; relying on that would be fragile.)
    """
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.utils.device_utils import resolve_safetensors_device
    from safetensors.torch import load_model

    if not strict:
        raise ValueError(
            f"{cls.__name__}.from_pretrained(strict=False) is not supported: a pruned checkpoint loads "
            "exactly or not at all (a partial load would leave random layers)"
        )
    hub: dict[str, Any] = {
        "force_download": force_download, "resume_download": resume_download, "proxies": proxies,
        "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only, "revision": revision,
    }
    if config is None:
        config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **hub, **kwargs)
    expected_cls = cls.config_class  # type: ignore[attr-defined]
    if not isinstance(config, expected_cls):
        raise TypeError(
            f"{pretrained_name_or_path}: config of type {getattr(config, 'type', type(config).__name__)!r}, but "
            f"{cls.__name__} loads {cls.name!r} checkpoints"  # type: ignore[attr-defined]
        )
    policy = cls(config, **kwargs)
    weights = _weights_file(pretrained_name_or_path, hub)
    check_weights(policy, weights, f"the {config.type} policy its config builds")
    # strict=True here as well: load_model raises on anything check_weights could have missed
    load_model(policy, str(weights), strict=True, device=resolve_safetensors_device(config.device))
    check_finite(policy, pretrained_name_or_path)
    policy.to(config.device)
    policy.eval()
    logger.info("loaded %s from %s", config.type, pretrained_name_or_path)
    return policy


def _weights_file(pretrained_name_or_path: str | Path, hub: dict[str, Any]) -> Path:
    """The checkpoint's ``model.safetensors``: in the directory, or downloaded from the hub."""
    if os.path.isdir(pretrained_name_or_path):
        path = Path(pretrained_name_or_path) / SAFETENSORS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a pruned checkpoint directory needs {SAFETENSORS_FILE}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(pretrained_name_or_path), filename=SAFETENSORS_FILE, **hub))


class StrictLoadMixin:
    """``from_pretrained`` through :func:`load_pretrained_strict`; mixed in before a stock policy class
    (every pruned type: pi0, pi0.5, GR00T N1.7)."""

    @classmethod
    def from_pretrained(
        cls,
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
    ) -> Any:
        """Load a pruned checkpoint; any missing, unexpected or reshaped tensor raises."""
        return load_pretrained_strict(
            cls,  # type: ignore[type-var]
            pretrained_name_or_path, config=config, force_download=force_download,
            resume_download=resume_download, proxies=proxies, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, revision=revision, strict=strict, **kwargs,
        )


class PrunedPolicyMixin(StrictLoadMixin):
    """What makes ``PI0PrunedPolicy`` / ``PI05PrunedPolicy`` pruned; mixed in before the stock policy class.

    Construction builds the stock structure at the recorded dimensions, then cuts both stacks to the
    kept layers; ``from_pretrained`` loads strictly. Training, ``select_action`` and processors stay
    the stock ones.
    """

    variant: str  # "pi0" or "pi05": which LeRobot modeling module builds it

    def __init__(self, config: Any, **kwargs: Any) -> None:
        with build_architecture(self.variant, config.architecture, config.vocab_size, config.source_num_layers,
                                config.paligemma_variant, config.action_expert_variant):
            super().__init__(config, **kwargs)  # type: ignore[call-arg]
        cut_stacks(self, config)  # type: ignore[arg-type]
