"""Property and equivalence tests for vlaprune.core.cka (CPU, seeded, float64 where it matters)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from vlaprune.core.cka import (
    PRESETS,
    CKAConfig,
    StreamingCKA,
    _center,
    _check_num_examples,
    _hsic_matrix,
    _hsic_matrix_features,
    _hsic_matrix_gram,
    _prefer_features,
    linear_cka,
    linear_hsic,
    saturation_warning,
    select_examples,
    top_direction_share,
)

F64 = torch.float64


def _hsic_gram(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> float:
    """HSIC of one pair through the library's Gram form."""
    _check_num_examples(x.shape[0], debiased)
    return float(_hsic_matrix_gram(_center([x, y]), debiased=debiased)[0, 1])


def _hsic_features(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> float:
    """HSIC of one pair through the library's feature (cross-product) form."""
    _check_num_examples(x.shape[0], debiased)
    return float(_hsic_matrix_features(_center([x, y]), debiased=debiased)[0, 1])


def _minibatch(**kwargs: object) -> CKAConfig:
    """The minibatch estimator (Nguyen et al. 2021); the library default is per-sample."""
    return CKAConfig(estimator="minibatch", **kwargs)  # type: ignore[arg-type]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _related(n: int, d1: int, d2: int, seed: int, offset: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a noisy linear function of it, both with a non-zero mean (centring must matter)."""
    x = _randn(n, d1, seed=seed) + offset
    y = torch.tanh(x @ _randn(d1, d2, seed=seed + 1)) + 0.5 * _randn(n, d2, seed=seed + 2) - offset
    return x, y


def _batch(
    widths: list[int], batch: int, tokens: int, seed: int, lengths: list[int] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Correlated (batch, tokens, D_i) states, like a residual stream, and a right-padded mask."""
    base = _randn(batch, tokens, widths[0], seed=seed)
    states = [base]
    for i, w in enumerate(widths[1:]):
        mix = _randn(states[-1].shape[-1], w, seed=seed + 10 + i)
        states.append(torch.tanh(states[-1] @ mix) + 0.3 * _randn(batch, tokens, w, seed=seed + 100 + i))
    lengths = lengths or [tokens - (b % 3) for b in range(batch)]
    mask = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]
    return states, mask


def _ref_hsic1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. 2012, eq. 5, literally: explicit Gram matrices with zeroed diagonal and loops."""
    n = x.shape[0]
    k = [[float(x[i] @ x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    l_ = [[float(y[i] @ y[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    trace_kl = sum(k[i][j] * l_[j][i] for i in range(n) for j in range(n))
    sum_k = sum(sum(row) for row in k)
    sum_l = sum(sum(row) for row in l_)
    k_rows = [sum(k[i]) for i in range(n)]
    l_cols = [sum(l_[j][i] for j in range(n)) for i in range(n)]  # (1ᵀ L̃)_i
    one_kl_one = sum(k_rows[j] * l_cols[j] for j in range(n))  # 1ᵀ K̃ L̃ 1
    return (trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * one_kl_one) / (n * (n - 3))


def _ref_hsic0(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019, eq. 3, literally: tr(K H L H) / (n-1)² with an explicit H."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    return float(torch.trace(x @ x.T @ h @ y @ y.T @ h)) / (n - 1) ** 2


# ------------------------------------------------------------------------------------ pairwise math
@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one(debiased: bool) -> None:
    x, _ = _related(40, 6, 6, seed=0)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 2.5 * x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_is_symmetric(debiased: bool) -> None:
    x, y = _related(30, 5, 9, seed=1)
    forward, backward = linear_cka(x, y, debiased=debiased), linear_cka(y, x, debiased=debiased)
    assert forward == pytest.approx(backward, abs=1e-14)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 5, 7), (12, 20, 30)])
def test_invariant_to_orthogonal_maps_and_isotropic_scaling(
    debiased: bool, shape: tuple[int, int, int]
) -> None:
    n, d1, d2 = shape
    x, y = _related(n, d1, d2, seed=2)
    q, _ = torch.linalg.qr(_randn(d1, d1, seed=3))
    base = linear_cka(x, y, debiased=debiased)
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.0 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 100.0, y, debiased=debiased) == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_not_invariant_to_general_invertible_map(debiased: bool) -> None:
    x = _randn(500, 10, seed=4)
    q, _ = torch.linalg.qr(_randn(10, 10, seed=5))
    a = q @ torch.diag(torch.tensor([100.0] + [1.0] * 9, dtype=F64)) @ q.T  # invertible, cond = 100
    assert torch.linalg.matrix_rank(a) == 10
    # Isotropic x: CKA(x, x a) ≈ ||a||_F² / (sqrt(d) ||aᵀa||_F) ≈ 1/sqrt(10), far from 1.
    assert linear_cka(x, x @ a, debiased=debiased) < 0.5


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(80, 6, 9), (10, 25, 40)])
def test_feature_form_equals_gram_form(debiased: bool, shape: tuple[int, int, int]) -> None:
    n, d1, d2 = shape
    x, y = _related(n, d1, d2, seed=6)
    gram, feat = _hsic_gram(x, y, debiased=debiased), _hsic_features(x, y, debiased=debiased)
    assert feat == pytest.approx(gram, rel=1e-10)
    assert linear_hsic(x, y, debiased=debiased) == pytest.approx(gram, rel=1e-10)
    # the stacked (states, states) versions, with three widths
    states = _center([x, y, torch.sin(x[:, :3])])
    g = _hsic_matrix_gram(states, debiased=debiased)
    f = _hsic_matrix_features(states, debiased=debiased)
    torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g.T, rtol=0, atol=1e-12)


def test_form_choice_follows_cost() -> None:
    assert _prefer_features(4096, [64, 64, 64])  # many examples, narrow states: XᵀY is cheap
    assert not _prefer_features(64, [4096, 4096, 4096])  # few examples, wide states: Gram is cheap
    assert _prefer_features(100_000, [4096] * 3)  # a Gram stack would not fit in memory
    for n, d in ((200, 6), (6, 200)):
        x, y = _related(n, d, d, seed=20)
        for debiased in (False, True):
            value = float(_hsic_matrix([x, y], debiased=debiased)[0, 1])
            assert value == pytest.approx(_hsic_gram(x, y, debiased=debiased), rel=1e-10)


@pytest.mark.parametrize("n", [4, 7, 12])
def test_debiased_hsic_matches_song_reference(n: int) -> None:
    x, y = _related(n, 3, 5, seed=7 + n, offset=2.0)  # uncentred data: the reference does not centre
    ref = _ref_hsic1(x, y)
    assert _hsic_gram(x, y, debiased=True) == pytest.approx(ref, rel=1e-8, abs=1e-10)
    assert _hsic_features(x, y, debiased=True) == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_biased_hsic_matches_kornblith_reference() -> None:
    x, y = _related(9, 4, 6, seed=8)
    ref = _ref_hsic0(x, y)
    assert _hsic_gram(x, y) == pytest.approx(ref, rel=1e-9)
    assert _hsic_features(x, y) == pytest.approx(ref, rel=1e-9)


def test_correlated_and_independent_data() -> None:
    x = _randn(200, 300, seed=9)
    noisy = x + 0.05 * _randn(200, 300, seed=10)
    assert linear_cka(x, noisy) > 0.99
    assert linear_cka(x, noisy, debiased=True) > 0.99
    y = _randn(200, 300, seed=11)  # independent; n < d, where the biased estimator is inflated
    biased, debiased = linear_cka(x, y), linear_cka(x, y, debiased=True)
    assert abs(debiased) < 0.05
    assert biased > 0.3
    assert abs(debiased) < abs(biased)


def test_debiased_needs_four_examples() -> None:
    x, y = _related(3, 4, 4, seed=12)
    with pytest.raises(ValueError, match="at least 4 examples, got n=3"):
        linear_cka(x, y, debiased=True)
    assert math.isfinite(linear_cka(x, y))  # the biased estimator is fine


def test_bad_pair_inputs_raise() -> None:
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(_randn(5, 2, seed=0), _randn(6, 2, seed=0))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(_randn(5, 2, 2, seed=0), _randn(5, 2, seed=0))
    with pytest.raises(ValueError, match="x is a constant representation"):
        linear_cka(torch.ones(10, 3), _randn(10, 3, seed=0))


def test_any_float_dtype_is_computed_in_float64() -> None:
    x, y = _related(50, 8, 8, seed=13)
    as_f32 = linear_cka(x.float(), y.float())
    assert as_f32 == pytest.approx(linear_cka(x.float().double(), y.float().double()), abs=1e-12)
    assert linear_cka(x.bfloat16(), y.bfloat16()) == pytest.approx(
        linear_cka(x.bfloat16().double(), y.bfloat16().double()), abs=1e-12
    )


# ---------------------------------------------------------------------------------- token selection
def test_select_examples_same_rows_for_every_state_when_subsampling() -> None:
    batch, tokens = 4, 30
    index = torch.arange(batch * tokens, dtype=F64).reshape(batch, tokens, 1)
    states = [index * (k + 1) + torch.zeros(1, 1, 2 + k, dtype=F64) for k in range(3)]  # widths 2, 3, 4
    mask = torch.arange(tokens)[None, :] < torch.tensor([30, 10, 25, 1])[:, None]
    rows = select_examples(states, mask, "tokens", max_tokens=20, generator=torch.Generator().manual_seed(0))
    ids = rows[0][:, 0].long()
    assert ids.numel() == 20 and ids.unique().numel() == 20
    assert mask.reshape(-1)[ids].all()  # only real tokens
    for k, r in enumerate(rows):
        assert r.shape == (20, 2 + k)
        torch.testing.assert_close(r[:, 0], ids.to(F64) * (k + 1), rtol=0, atol=0)


def test_last_token_with_left_and_right_padding() -> None:
    states = [torch.arange(2 * 5, dtype=F64).reshape(2, 5, 1)]
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert select_examples(states, right, "last")[0].flatten().tolist() == [2.0, 9.0]
    assert select_examples(states, left, "last")[0].flatten().tolist() == [4.0, 9.0]
    mean = select_examples(states, left, "mean")[0].flatten().tolist()
    assert mean == pytest.approx([3.0, 7.5])


def test_sample_without_valid_token_raises() -> None:
    states, mask = _batch([4, 4], batch=3, tokens=5, seed=14)
    mask[1] = False
    with pytest.raises(ValueError, match="sample 1 "):
        select_examples(states, mask, "tokens")
    for estimator in ("minibatch", "per_sample"):
        with pytest.raises(ValueError, match="sample 1 "):
            StreamingCKA(2, CKAConfig(estimator=estimator)).update(states, mask)


def test_select_examples_input_errors() -> None:
    states, mask = _batch([4, 4], batch=3, tokens=5, seed=15)
    with pytest.raises(ValueError, match="mode='first' is unknown"):
        select_examples(states, mask, "first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask must be None"):
        select_examples([s[:, 0] for s in states], mask, "tokens")
    with pytest.raises(ValueError, match=r"states\[1\] has shape"):
        select_examples([states[0], states[1][:2]], mask, "tokens")
    with pytest.raises(ValueError, match="mask has shape"):
        select_examples(states, mask[:, :3], "tokens")


# -------------------------------------------------------------------------------------- streaming
def _expected_examples(states: list[torch.Tensor], mask: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Examples selected by hand, independently of select_examples."""
    if mode == "tokens":
        return [s[mask] for s in states]
    out = []
    for s in states:
        rows = []
        for b in range(s.shape[0]):
            real = s[b][mask[b]]
            rows.append(real.mean(dim=0) if mode == "mean" else real[-1])
        out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("mode", ["tokens", "mean", "last"])
def test_streaming_one_batch_equals_pairwise_linear_cka(debiased: bool, mode: str) -> None:
    states, mask = _batch([6, 6, 9, 4], batch=8, tokens=12, seed=16)
    acc = StreamingCKA(4, _minibatch(tokens=mode, debiased=debiased, max_tokens=None))  # type: ignore[arg-type]
    acc.update(states, mask)
    cka = acc.compute()
    examples = _expected_examples(states, mask, mode)
    expected = torch.tensor(
        [[linear_cka(a, b, debiased=debiased) for b in examples] for a in examples], dtype=F64
    )
    torch.testing.assert_close(cka, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(cka, cka.T)
    assert torch.equal(cka.diagonal(), torch.ones(4, dtype=F64))
    assert acc.num_updates == 1 and acc.num_examples == examples[0].shape[0]


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_two_dim_states(debiased: bool) -> None:
    states, _ = _batch([5, 7, 3], batch=16, tokens=1, seed=17)
    flat = [s[:, 0] for s in states]
    acc = StreamingCKA(3, _minibatch(debiased=debiased))
    acc.update(flat)
    expected = linear_cka(flat[0], flat[1], debiased=debiased)
    assert float(acc.compute()[0, 1]) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_minibatch_over_batches_is_mean_hsic_ratio(debiased: bool) -> None:
    batches = [_batch([5, 5, 8], batch=4, tokens=6 + b, seed=20 + b) for b in range(3)]
    acc = StreamingCKA(3, _minibatch(debiased=debiased, max_tokens=None))
    for states, mask in batches:
        acc.update(states, mask)
    hsic = torch.zeros(3, 3, dtype=F64)
    for states, mask in batches:
        ex = [s[mask] for s in states]
        hsic += torch.tensor([[linear_hsic(a, b, debiased=debiased) for b in ex] for a in ex], dtype=F64)
    hsic /= len(batches)
    expected = hsic / torch.sqrt(torch.outer(hsic.diagonal(), hsic.diagonal()))
    torch.testing.assert_close(acc.compute(), expected, rtol=1e-9, atol=1e-12)
    assert acc.num_updates == 3
    assert acc.num_examples == sum(int(m.sum()) for _, m in batches)


@pytest.mark.parametrize("debiased", [False, True])
def test_per_sample_is_mean_of_per_sample_linear_cka(debiased: bool) -> None:
    batches = [_batch([5, 6, 4], batch=3, tokens=9, seed=30 + b) for b in range(2)]
    acc = StreamingCKA(3, CKAConfig(estimator="per_sample", debiased=debiased, max_tokens=None))
    total = torch.zeros(3, 3, dtype=F64)
    count = 0
    for states, mask in batches:
        acc.update(states, mask)
        for b in range(mask.shape[0]):
            ex = [s[b][mask[b]] for s in states]
            total += torch.tensor([[linear_cka(x, y, debiased=debiased) for y in ex] for x in ex], dtype=F64)
            count += 1
    torch.testing.assert_close(acc.compute(), total / count, rtol=1e-9, atol=1e-12)
    assert acc.num_updates == count == 6


@pytest.mark.parametrize(
    ("config", "garbage"),
    [
        (_minibatch(tokens="tokens", max_tokens=None), float("nan")),
        (_minibatch(tokens="mean"), float("inf")),
        (_minibatch(tokens="mean", debiased=True), 1e30),
        (_minibatch(tokens="last"), float("nan")),
        (CKAConfig(estimator="per_sample", max_tokens=None), 1e30),
        (_minibatch(tokens="tokens", max_tokens=8), float("nan")),
    ],
)
def test_padding_never_counts(config: CKAConfig, garbage: float) -> None:
    states, mask = _batch([6, 6, 6], batch=6, tokens=10, seed=40, lengths=[10, 7, 3, 9, 5, 8])
    dirty = [s.masked_fill(~mask[..., None], garbage) for s in states]
    clean, noisy = StreamingCKA(3, config), StreamingCKA(3, config)
    clean.update([s.masked_fill(~mask[..., None], 0.0) for s in states], mask)
    noisy.update(dirty, mask)
    assert torch.isfinite(noisy.compute()).all()
    torch.testing.assert_close(noisy.compute(), clean.compute(), rtol=1e-12, atol=1e-12)


def test_subsampling_is_seeded() -> None:
    batches = [_batch([6, 6, 6], batch=4, tokens=20, seed=50 + b) for b in range(3)]

    def run(seed: int) -> torch.Tensor:
        acc = StreamingCKA(3, _minibatch(max_tokens=16, seed=seed))
        for states, mask in batches:
            acc.update(states, mask)
        assert acc.num_examples == 3 * 16
        return acc.compute()

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1), rtol=0, atol=1e-6)


def test_constant_state_gives_nan_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    states, mask = _batch([5, 5, 5], batch=4, tokens=6, seed=60)
    states[1] = torch.full_like(states[1], 0.7)
    acc = StreamingCKA(3, _minibatch(max_tokens=None))
    acc.update(states, mask)
    with caplog.at_level(logging.WARNING, logger="vlaprune.core.cka"):
        cka = acc.compute()
    assert "states [1]" in caplog.text
    assert cka[1].isnan().all() and cka[:, 1].isnan().all()
    assert cka[0, 2] == cka[2, 0] and cka[0, 0] == cka[2, 2] == 1.0


def test_streaming_input_errors() -> None:
    states, mask = _batch([4, 4, 4], batch=5, tokens=4, seed=70)
    acc = StreamingCKA(3, _minibatch(tokens="mean", debiased=True))
    with pytest.raises(ValueError, match="expected 3 states"):
        acc.update(states[:2], mask)
    with pytest.raises(ValueError, match=r"states\[2\] has shape"):
        acc.update([states[0], states[1], states[2][:4]], mask)
    with pytest.raises(ValueError, match="same batch size"):
        acc.update([states[0][:, 0], states[1][:, 0], states[2][:3, 0]])
    with pytest.raises(ValueError, match="at least 4 examples, got n=3"):
        acc.update([s[:3] for s in states], mask[:3])
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    with pytest.raises(ValueError, match="needs \\(batch, tokens, hidden\\)"):
        StreamingCKA(3, PRESETS["paper"]).update([s[:, 0] for s in states])


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"estimator": "full"}, "estimator='full' is unknown; choose one of minibatch, per_sample"),
        ({"tokens": "cls"}, "tokens='cls' is unknown; choose one of tokens, mean, last"),
        ({"max_tokens": 3}, "max_tokens=3 must be an int >= 4"),
        ({"estimator": "per_sample", "tokens": "mean"}, "tokens must be 'tokens'"),
        ({"debiased": "yes"}, "debiased='yes'"),
        ({"token_norm": "l2"}, "token_norm='l2' is unknown; choose one of none, rms"),
        ({"feature_norm": "whiten"}, "feature_norm='whiten' is unknown; choose one of none, standardize"),
        ({"skip_tokens": -1}, "skip_tokens=-1 must be an int >= 0"),
    ],
)
def test_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        CKAConfig(**kwargs)  # type: ignore[arg-type]


def test_presets() -> None:
    assert CKAConfig.preset("default") == CKAConfig() == PRESETS["default"]
    paper = CKAConfig.preset("paper")
    fields = (paper.estimator, paper.tokens, paper.max_tokens, paper.debiased)
    assert fields == ("per_sample", "tokens", None, False)
    assert CKAConfig.preset("minibatch", debiased=True, tokens="last").debiased is True
    with pytest.raises(ValueError, match="presets: default, paper, minibatch"):
        CKAConfig.preset("fast")
    with pytest.raises(ValueError, match="unknown CKAConfig field"):
        CKAConfig.preset("default", max_token=5)
    with pytest.raises(ValueError, match="tokens must be 'tokens'"):
        CKAConfig.preset("paper", tokens="mean")


# ---------------------------------------------------------------------------------------- memory
def test_memory_is_flat() -> None:
    def tensor_bytes(acc: StreamingCKA) -> int:  # every tensor the accumulator holds
        tensors = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
        return sum(v.numel() * v.element_size() for v in tensors)

    for config in (_minibatch(max_tokens=8), CKAConfig.preset("paper")):
        acc = StreamingCKA(3, config)
        acc.update(*_batch([4, 4, 4], batch=2, tokens=6, seed=100))
        size = tensor_bytes(acc)
        for b in range(30):
            acc.update(*_batch([4, 4, 4], batch=2, tokens=6, seed=101 + b))
        assert tensor_bytes(acc) == size


def test_streaming_cosine_matches_tokenwise_mean() -> None:
    from vlaprune.core.cka import StreamingCosine

    gen = torch.Generator().manual_seed(3)
    states = [torch.randn(2, 5, 4, generator=gen) for _ in range(3)]
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    states[0][~mask] = 1e30  # padding never counts
    acc = StreamingCosine(3)
    acc.update(states, mask)
    acc.update(states, mask)
    ref = torch.zeros(3, 3, dtype=F64)
    for i in range(3):
        for j in range(3):
            cos = torch.nn.functional.cosine_similarity(states[i][mask].double(), states[j][mask].double(), dim=-1)
            ref[i, j] = cos.mean()
    torch.testing.assert_close(acc.compute(), ref)
    assert torch.allclose(acc.compute().diagonal(), torch.ones(3, dtype=F64))


# ------------------------------------------------------------------------------------ conditioning
def _states(batch: int = 3, tokens: int = 40, width: int = 48, seed: int = 0) -> list[torch.Tensor]:
    """Two residual states around a block that changes them a lot."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=g, dtype=F64)
    return [x, x + 1.5 * torch.randn(batch, tokens, width, generator=g, dtype=F64)]


def _massive(states: list[torch.Tensor], sink: bool = True, seed: int = 1) -> list[torch.Tensor]:
    """``states`` with what pretrained transformers carry in every block alike: one massive hidden
    dimension and, with ``sink``, a first token 50 times larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    outlier = 300.0 * (1 + 0.2 * torch.randn(states[0].shape[:2], generator=g, dtype=F64))
    out = [s.clone() for s in states]
    for s in out:
        s[..., 5] += outlier
        if sink:
            s[:, 0] *= 50.0
    return out


def _adjacent(config: CKAConfig, states: list[torch.Tensor], mask: torch.Tensor | None = None) -> float:
    acc = StreamingCKA(len(states), config)
    acc.update(states, mask)
    return float(acc.compute()[0, 1])


@pytest.mark.parametrize("estimator", ["per_sample", "minibatch"])
def test_conditioning_sees_past_massive_activations(estimator: str) -> None:
    """Plain CKA reads the outliers (1.000); conditioned CKA reads what the block changed: close to the
    CKA of the same states without them."""
    clean = _states()
    clean_cka = _adjacent(CKAConfig(estimator=estimator), clean)
    assert clean_cka < 0.75
    dimension, both = _massive(clean, sink=False), _massive(clean)
    assert _adjacent(CKAConfig(estimator=estimator), dimension) > 0.999
    assert _adjacent(CKAConfig(estimator=estimator), both) > 0.999
    near = {"abs": 0.04}
    assert _adjacent(CKAConfig(estimator=estimator, feature_norm="standardize"), dimension) == pytest.approx(
        clean_cka, **near)
    assert _adjacent(CKAConfig(estimator=estimator, feature_norm="standardize"), both) > 0.95  # the sink dominates
    assert _adjacent(CKAConfig(estimator=estimator, feature_norm="standardize", skip_tokens=1), both) == (
        pytest.approx(clean_cka, **near))
    assert _adjacent(CKAConfig(estimator=estimator, token_norm="rms"), both) < 0.85  # partly: the dimension stays


def test_standardized_cka_ignores_the_scale_of_any_dimension() -> None:
    states = _states()
    scaled = [s.clone() for s in states]
    for s in scaled:
        s[..., 7] *= 1000.0
    config = CKAConfig(feature_norm="standardize")
    assert _adjacent(config, scaled) == pytest.approx(_adjacent(config, states), abs=1e-9)


def test_skipped_tokens_are_not_examples_with_left_or_right_padding() -> None:
    states = _massive(_states(batch=2, tokens=12))
    right = torch.ones(2, 12, dtype=torch.bool)
    right[1, 9:] = False
    left = torch.ones(2, 12, dtype=torch.bool)
    left[1, :3] = False
    config = CKAConfig(skip_tokens=2, max_tokens=None)
    for mask in (right, left):
        first_real = [int(mask[b].nonzero()[0]) for b in range(2)]
        expected = mask.clone()
        for b, start in enumerate(first_real):
            expected[b, start : start + 2] = False  # the first two real tokens of each sample
        assert _adjacent(config, states, mask) == pytest.approx(
            _adjacent(CKAConfig(max_tokens=None), states, expected), abs=1e-12)
    with pytest.raises(ValueError, match="sample 1 of the batch has no real token left after skipping the first 9"):
        _adjacent(CKAConfig(skip_tokens=9), states, right)
    with pytest.raises(ValueError, match="skip_tokens needs"):
        _adjacent(CKAConfig(estimator="minibatch", skip_tokens=1), [s[:, 0] for s in states])


def test_rms_tokens_are_what_the_next_norm_reads() -> None:
    states = _massive(_states(batch=2, tokens=16))
    rms = [s / s.square().mean(dim=-1, keepdim=True).sqrt() for s in states]
    assert _adjacent(CKAConfig(token_norm="rms"), states) == pytest.approx(_adjacent(CKAConfig(), rms), abs=1e-12)
    scaled = [s * torch.linspace(0.1, 10.0, 16, dtype=F64)[None, :, None] for s in states]  # per-token scale
    assert _adjacent(CKAConfig(token_norm="rms"), scaled) == pytest.approx(
        _adjacent(CKAConfig(token_norm="rms"), states), abs=1e-12)


def test_a_saturated_matrix_is_named_with_the_remedies_not_in_use() -> None:
    cka = torch.eye(5, dtype=F64)
    for i in range(4):
        cka[i, i + 1] = cka[i + 1, i] = (0.9995, 0.9999, 0.95, 1.0)[i]
    text = saturation_warning("vlm", cka, CKAConfig(skip_tokens=1))
    assert text is not None and "3 of its 4 blocks" in text and "blocks [0, 1, 3]" in text
    assert "--cka.token_norm=rms" in text and "--plan.method=loss" in text
    assert "--cka.token_norm" not in saturation_warning("vlm", cka, CKAConfig(token_norm="rms"))
    cka[1, 2] = cka[2, 1] = 0.99  # two of four: half, not most
    assert saturation_warning("vlm", cka, CKAConfig()) is None
    text = saturation_warning("vlm", cka, CKAConfig(), [0.95, 0.97, 0.2, 0.99, 0.93])  # 4 of 5 states dominated
    assert text is not None and "in 4 of its 5 residual states one principal direction" in text
    assert "states [0, 1, 3, 4]" in text and "blocks [" not in text
    assert saturation_warning("vlm", cka, CKAConfig(), [0.95, 0.97, 0.2, 0.5, 0.3]) is None


def test_the_top_direction_share_sees_a_massive_dimension() -> None:
    states = _states(batch=2, tokens=16)
    plain = top_direction_share(states)
    heavy = top_direction_share(_massive(states))
    assert len(plain) == len(states) and all(0 < v < 0.5 for v in plain)
    assert all(v > 0.9 for v in heavy)
    x = states[0].reshape(-1, states[0].shape[-1]).to(F64)
    x = x - x.mean(dim=0)
    eig = torch.linalg.eigvalsh(x.T @ x)  # the share is the covariance's top eigenvalue over its trace
    assert plain[0] == pytest.approx(float(eig[-1] / eig.sum()), rel=1e-9)
