"""int8-row storage: within half a step of every element, exact for what it keeps as float32, clear errors."""

from __future__ import annotations

import pytest
import torch

from vlaprune.io.quantized import FORMAT, load_quantized, quantize_rows, save_quantized


def test_matrices_reload_within_half_a_step_and_the_rest_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(300, 400, generator=g) * torch.linspace(0.01, 3.0, 300)[:, None]  # rows of other scales
    matrix[7] = 0.0
    tensors = {"big": matrix, "small": torch.randn(20, 30, generator=g), "bias": torch.randn(300, generator=g),
               "steps": torch.arange(5)}
    path = tmp_path / "w.safetensors"
    save_quantized(tensors, path, min_numel=10_000, metadata={"seed": "3"})
    loaded, metadata = load_quantized(path)
    assert metadata == {"seed": "3", "format": FORMAT}
    assert loaded.keys() == tensors.keys()
    step = matrix.abs().amax(dim=1, keepdim=True) / 127
    error = (loaded["big"] - matrix).abs()
    assert (error <= step * 0.502 + 1e-12).all() and error.max() > 0  # fp16 scales: a hair over half a step
    assert torch.equal(loaded["big"][7], torch.zeros(400))
    for name in ("small", "bias", "steps"):
        assert torch.equal(loaded[name], tensors[name]), name
    assert path.stat().st_size < 300 * 400 * 1.05 + 20 * 30 * 4 + 300 * 4 + 4096  # one byte per element
    assert not list(tmp_path.glob("*.partial"))


def test_bad_inputs_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match=r"2-D floating"):
        quantize_rows(torch.zeros(3))
    with pytest.raises(ValueError, match="reserves"):
        save_quantized({"w:scale": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"not a vlaprune\.int8-rows\.v1 file"):
        load_quantized(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(4, 2), "w:scale": torch.ones(3, dtype=torch.float16)},
              str(tmp_path / "torn.safetensors"), metadata={"format": FORMAT})
    with pytest.raises(ValueError, match=r"w is stored as torch\.float32"):
        load_quantized(tmp_path / "torn.safetensors")
