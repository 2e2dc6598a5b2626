"""Linear CKA between the residual-stream states of a transformer stack.

A stack of L blocks has L+1 residual states: index 0 of a stack's matrix is the stack's *input*
(the residual entering block 0) and index i is the input of block i, so ``cka[i, i + 1]`` compares
the residual before and after block i. A block whose output is almost linearly the same as its input
(CKA close to 1) is a candidate for removal.

Linear CKA (Kornblith et al. 2019) normalises the Hilbert-Schmidt Independence Criterion of linear
kernels, ``CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))``. It is invariant to orthogonal
transforms and isotropic scaling of either representation, but not to general linear maps.

* Biased vs debiased. ``HSIC_0 = tr(K H L H) / (n-1)^2`` (Kornblith et al. 2019, eq. 3) is biased
  upward when n is small next to the width: two independent high-dimensional representations get a
  clearly positive CKA. The unbiased ``HSIC_1`` of Song et al. (2012, eq. 5) removes that bias and
  needs n >= 4 examples; its CKA can be slightly negative.
* Minibatch vs per-sample. The minibatch estimator (Nguyen, Raghu & Kornblith 2021, eq. 2) averages
  HSIC over batches and normalises at the end: ``CKA_ij = mean HSIC_ij / sqrt(mean HSIC_ii mean HSIC_jj)``.
  The per-sample estimator is the one of the layer-pruning paper we reproduce: a biased CKA per
  calibration sample with that sample's tokens as the examples, averaged over samples.
* Conditioning. Pretrained transformers carry massive activations: a few hidden dimensions (and a
  few "sink" tokens, often the first) hundreds of times larger than the rest, the same in every
  block, so that every pair of residual states looks linearly identical (CKA 1.000). Three options
  act on the examples before HSIC: ``skip_tokens`` drops the first real tokens of each sample,
  ``token_norm="rms"`` divides each token by its root mean square (what the next block's norm
  reads), ``feature_norm="standardize"`` scales each hidden dimension to unit variance over the
  examples, so no single dimension dominates (CKA then compares correlation, not covariance).
* Streaming. Both estimators are means, so :class:`StreamingCKA` only keeps a (states, states)
  float64 sum and a count: memory stays flat however many batches are seen, and sums from several
  processes add up (:meth:`StreamingCKA.all_reduce`) to the single-process result.

All arithmetic is in float64, whatever the dtype of the states.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

TokenMode = Literal["tokens", "mean", "last"]
Estimator = Literal["minibatch", "per_sample"]
TokenNorm = Literal["none", "rms"]
FeatureNorm = Literal["none", "standardize"]
_TOKEN_MODES: tuple[str, ...] = get_args(TokenMode)
_ESTIMATORS: tuple[str, ...] = get_args(Estimator)
_TOKEN_NORMS: tuple[str, ...] = get_args(TokenNorm)
_FEATURE_NORMS: tuple[str, ...] = get_args(FeatureNorm)

# A stack of float64 n×n Gram matrices larger than this uses the feature form instead.
_GRAM_MAX_BYTES = 2**31


# --------------------------------------------------------------------------------------------- HSIC
def _check_num_examples(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise ValueError(
            f"debiased CKA needs at least 4 examples, got n={n}; use more calibration samples "
            "(or tokens per batch) or debiased=False"
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got n={n}; use more calibration samples per batch")


def _center(examples: Sequence[Tensor]) -> list[Tensor]:
    """float64, column-centred copies of (n, d_i) features; a constant state becomes exactly zero.

    Centring is what HSIC_0 needs (K_c = H K H = X_c X_cᵀ). HSIC_1 is unchanged by a translation of
    the features (U-centring cancels it, Székely & Rizzo 2014), so centring it too only removes the
    cancellation that a large mean would cause in float64.
    """
    out = []
    for x in examples:
        x64 = x.detach().to(torch.float64)
        if bool((x64 == x64[:1]).all()):  # exact test, so a constant state gives HSIC exactly 0
            out.append(torch.zeros_like(x64))
        else:
            out.append(x64 - x64.mean(dim=0, keepdim=True))
    return out


def _song_hsic1(trace_term: Tensor, row_sums: Tensor, n: int) -> Tensor:
    """Unbiased HSIC_1 (Song et al. 2012, eq. 5) for all pairs of states.

    With K̃ the Gram matrix with zeroed diagonal: HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2))
    - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3)). ``trace_term`` is the (S, S) matrix of tr(K̃_i K̃_j) and
    ``row_sums`` the (S, n) stack of K̃_i 1, so 1ᵀK̃_i K̃_j 1 = (K̃_i 1)·(K̃_j 1).
    """
    totals = row_sums.sum(dim=1)  # (S,) 1ᵀK̃1
    return (
        trace_term
        + torch.outer(totals, totals) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (row_sums @ row_sums.T)
    ) / (n * (n - 3))


def _hsic_matrix_gram(xs: Sequence[Tensor], *, debiased: bool) -> Tensor:
    """(S, S) HSIC between centred (n, d_i) features via n×n Gram matrices: O(S n² d + S² n²)."""
    n = xs[0].shape[0]
    grams = torch.stack([x @ x.T for x in xs])  # (S, n, n); K_c = X_c X_cᵀ
    flat = grams.reshape(len(xs), n * n)
    if not debiased:
        # Kornblith et al. 2019, eq. 3: HSIC_0 = tr(K_c L_c) / (n-1)² = <K_c, L_c>_F / (n-1)².
        return flat @ flat.T / (n - 1) ** 2
    grams.diagonal(dim1=1, dim2=2).zero_()  # K̃ (flat is a view of it)
    return _song_hsic1(flat @ flat.T, grams.sum(dim=2), n)


def _hsic_matrix_features(xs: Sequence[Tensor], *, debiased: bool) -> Tensor:
    """(S, S) HSIC between centred (n, d_i) features without n×n matrices: O(n (Σ d_i)²).

    tr(K L) = ||Xᵀ Y||_F². For HSIC_1 the zero-diagonal terms follow from features too:
    tr(K̃L̃) = ||XᵀY||_F² - Σ_i ||x_i||² ||y_i||², (K̃1)_i = x_i·Σ_k x_k - ||x_i||².
    """
    num, n = len(xs), xs[0].shape[0]
    widths = [x.shape[1] for x in xs]
    stacked = torch.cat(list(xs), dim=1)  # (n, Σ d_i)
    cross = torch.empty(num, num, dtype=torch.float64, device=stacked.device)
    offset = 0
    for i, x in enumerate(xs):
        col_sq = (x.T @ stacked[:, offset:]).square().sum(dim=0)  # (Σ_{j>=i} d_j,)
        row = torch.stack([c.sum() for c in col_sq.split(widths[i:])])  # ||X_iᵀ X_j||_F², j >= i
        cross[i, i:] = row
        cross[i:, i] = row
        offset += widths[i]
    if not debiased:
        return cross / (n - 1) ** 2  # Kornblith et al. 2019, eq. 3 in feature space
    sq_norms = torch.stack([x.square().sum(dim=1) for x in xs])  # (S, n) diag of each K
    row_sums = torch.stack([x @ x.sum(dim=0) for x in xs]) - sq_norms  # (S, n) K̃1
    return _song_hsic1(cross - sq_norms @ sq_norms.T, row_sums, n)


def _prefer_features(n: int, widths: Sequence[int]) -> bool:
    """Pick the cheaper form by flop count; the Gram form also has a memory cap."""
    num, total = len(widths), sum(widths)
    gram_flops = n * n * total + num * num * n * n
    feature_flops = n * sum(w * sum(widths[i:]) for i, w in enumerate(widths))
    return feature_flops <= gram_flops or 8 * num * n * n > _GRAM_MAX_BYTES


def _hsic_matrix(examples: Sequence[Tensor], *, debiased: bool) -> Tensor:
    """(S, S) float64 HSIC between S representations of the same n examples, each (n, d_i)."""
    n = examples[0].shape[0]
    assert all(x.dim() == 2 and x.shape[0] == n for x in examples), "examples must share n rows"
    _check_num_examples(n, debiased)
    xs = _center(examples)
    if _prefer_features(n, [x.shape[1] for x in xs]):
        return _hsic_matrix_features(xs, debiased=debiased)
    return _hsic_matrix_gram(xs, debiased=debiased)


def _normalize(hsic: Tensor) -> Tensor:
    """CKA from an HSIC matrix: symmetric, diagonal exactly 1, nan rows/columns for zero self-HSIC."""
    diag = hsic.diagonal()
    valid = diag > 0
    scale = torch.where(valid, diag, torch.nan).sqrt()
    cka = hsic / torch.outer(scale, scale)
    cka = (cka + cka.T) / 2
    cka.diagonal().copy_(torch.where(valid, 1.0, torch.nan))
    return cka


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D (examples, features); got shapes {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of examples (rows); got {x.shape[0]} "
                         f"and {y.shape[0]}")


def _hsic_gram(x: Tensor, y: Tensor, *, debiased: bool = False) -> float:
    """HSIC of one pair through Gram matrices (tests check it against :func:`_hsic_features`)."""
    _check_pair(x, y)
    _check_num_examples(x.shape[0], debiased)
    return float(_hsic_matrix_gram(_center([x, y]), debiased=debiased)[0, 1])


def _hsic_features(x: Tensor, y: Tensor, *, debiased: bool = False) -> float:
    """HSIC of one pair through feature cross-products (tests check it against :func:`_hsic_gram`)."""
    _check_pair(x, y)
    _check_num_examples(x.shape[0], debiased)
    return float(_hsic_matrix_features(_center([x, y]), debiased=debiased)[0, 1])


def linear_hsic(x: Tensor, y: Tensor, *, debiased: bool = False) -> float:
    """HSIC of linear kernels between x (n, d1) and y (n, d2): HSIC_0, or HSIC_1 if ``debiased``."""
    _check_pair(x, y)
    return float(_hsic_matrix([x, y], debiased=debiased)[0, 1])


def linear_cka(x: Tensor, y: Tensor, *, debiased: bool = False) -> float:
    """Linear CKA between x (n, d1) and y (n, d2), the same n examples in the same order."""
    _check_pair(x, y)
    hsic = _hsic_matrix([x, y], debiased=debiased)
    for name, value in (("x", hsic[0, 0]), ("y", hsic[1, 1])):
        if value <= 0:
            raise ValueError(f"{name} is a constant representation (zero self-HSIC), so CKA is undefined; "
                             "check that the states differ between examples")
    return float(hsic[0, 1] / torch.sqrt(hsic[0, 0] * hsic[1, 1]))


# ------------------------------------------------------------------------------------------- tokens
def _valid_tokens(states: Sequence[Tensor], mask: Tensor | None) -> Tensor:
    """Validate (batch, tokens, hidden) states and return the (batch, tokens) bool mask of real tokens."""
    batch, tokens = states[0].shape[:2]
    for i, s in enumerate(states):
        if s.dim() != 3 or s.shape[:2] != (batch, tokens):
            raise ValueError(f"states[{i}] has shape {tuple(s.shape)}; every state must be (batch, tokens, "
                             f"hidden) with batch and tokens {(batch, tokens)} like states[0]")
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=states[0].device)
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected (batch, tokens) = {(batch, tokens)}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    empty = (valid.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sample {empty[0]} of the batch has no valid token in mask (empty samples: "
                         f"{empty}); drop it from the batch or fix its mask")
    return valid


def select_examples(
    states: Sequence[Tensor],
    mask: Tensor | None,
    mode: TokenMode,
    *,
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Turn a batch of states into CKA examples: one (n, D_i) tensor per state, same rows for all.

    ``states`` are (batch, tokens, D_i) with ``mask`` (batch, tokens), True = real token, or
    already (batch, D_i) (then mask must be None). ``mode`` "tokens" takes every real token
    (a seeded subsample of ``max_tokens`` if there are more), "mean" the masked mean per sample
    (returned in float64), "last" the last real token per sample (left or right padding).
    """
    if len(states) == 0:
        raise ValueError("states is empty; pass one tensor per residual state of the stack")
    if mode not in _TOKEN_MODES:
        raise ValueError(f"mode={mode!r} is unknown; choose one of {', '.join(_TOKEN_MODES)}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be a positive int or None (no subsampling)")
    if all(s.dim() == 2 for s in states):
        if mask is not None:
            raise ValueError("mask must be None when states are (batch, hidden): there are no tokens to mask")
        sizes = {s.shape[0] for s in states}
        if len(sizes) != 1:
            raise ValueError(f"all states must have the same batch size; got {sorted(sizes)}")
        return [s.detach() for s in states]
    valid = _valid_tokens(states, mask)
    batch, tokens = valid.shape
    if mode == "tokens":
        idx = valid.reshape(-1).nonzero().flatten()  # flat (batch * tokens) indices of real tokens
        if max_tokens is not None and idx.numel() > max_tokens:
            device = generator.device if generator is not None else torch.device("cpu")
            keep = torch.randperm(idx.numel(), generator=generator, device=device)[:max_tokens]
            idx = idx[keep.to(idx.device).sort().values]
        return [s.detach().reshape(batch * tokens, -1).index_select(0, idx.to(s.device)) for s in states]
    if mode == "mean":
        counts = valid.sum(dim=1, keepdim=True).to(torch.float64)  # (batch, 1)
        # masked_fill, not a product: padding may hold inf/nan garbage
        return [
            s.detach().to(torch.float64).masked_fill(~valid.to(s.device)[..., None], 0.0).sum(dim=1)
            / counts.to(s.device)
            for s in states
        ]
    positions = torch.arange(tokens, device=valid.device).expand(batch, tokens)
    last = torch.where(valid, positions, -1).amax(dim=1)  # (batch,) last real token
    rows = torch.arange(batch, device=valid.device)
    return [s.detach()[rows.to(s.device), last.to(s.device)] for s in states]


def skip_leading_tokens(valid: Tensor, count: int) -> Tensor:
    """``valid`` (batch, tokens) without the first ``count`` real tokens of each sample (left or right padding)."""
    if count == 0:
        return valid
    kept = valid & (valid.cumsum(dim=1) > count)
    short = (kept.sum(dim=1) == 0).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"sample {short[0]} of the batch has no real token left after skipping the first {count} "
                         f"(samples: {short}); lower skip_tokens")
    return kept


def condition_examples(examples: Sequence[Tensor], token_norm: str, feature_norm: str) -> list[Tensor]:
    """The (n, D_i) examples as CKA sees them: each row divided by its root mean square (``"rms"``),
    each column scaled to unit variance over the n rows (``"standardize"``; constant columns give 0)."""
    if token_norm == "none" and feature_norm == "none":
        return list(examples)
    out = []
    for x in examples:
        x = x.detach().to(torch.float64)
        if token_norm == "rms":
            rms = x.square().mean(dim=1, keepdim=True).sqrt()
            x = x / torch.where(rms > 0, rms, 1.0)
        if feature_norm == "standardize":
            x = x - x.mean(dim=0, keepdim=True)
            std = x.square().mean(dim=0, keepdim=True).sqrt()
            x = x / torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.inf)
        out.append(x)
    return out


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class CKAConfig:
    """How CKA is estimated. See the module docstring for the estimators."""

    estimator: Estimator = "per_sample"
    debiased: bool = False
    tokens: TokenMode = "tokens"
    max_tokens: int | None = 1024  # per batch (minibatch) or per sample (per_sample); None = all
    seed: int = 0  # seeds token subsampling
    skip_tokens: int = 0  # the first real tokens of each sample are not examples (attention sinks)
    token_norm: TokenNorm = "none"  # "rms": each token divided by its root mean square
    feature_norm: FeatureNorm = "none"  # "standardize": each hidden dimension at unit variance

    def __post_init__(self) -> None:
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is unknown; choose one of "
                             f"{', '.join(_ESTIMATORS)}")
        if self.tokens not in _TOKEN_MODES:
            raise ValueError(f"tokens={self.tokens!r} is unknown; choose one of {', '.join(_TOKEN_MODES)}")
        if not isinstance(self.debiased, bool):
            raise ValueError(f"debiased={self.debiased!r} must be True or False")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 4
        ):
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 4 or None (no subsampling)")
        if self.token_norm not in _TOKEN_NORMS:
            raise ValueError(f"token_norm={self.token_norm!r} is unknown; choose one of {', '.join(_TOKEN_NORMS)}")
        if self.feature_norm not in _FEATURE_NORMS:
            raise ValueError(f"feature_norm={self.feature_norm!r} is unknown; choose one of "
                             f"{', '.join(_FEATURE_NORMS)}")
        if isinstance(self.skip_tokens, bool) or not isinstance(self.skip_tokens, int) or self.skip_tokens < 0:
            raise ValueError(f"skip_tokens={self.skip_tokens!r} must be an int >= 0")
        if self.estimator == "per_sample" and self.tokens != "tokens":
            raise ValueError(f"estimator='per_sample' uses each sample's tokens as its examples, so tokens "
                             f"must be 'tokens', got {self.tokens!r}; use estimator='minibatch' for "
                             "'mean' or 'last'")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CKAConfig:
        """A named preset from :data:`PRESETS`, with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"CKA preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown CKAConfig field(s) {unknown}; fields: {', '.join(sorted(known))}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, CKAConfig] = {
    # Chosen by measurement (benchmarks/cka_estimators.py, README): per-sample biased CKA ranked real
    # pruning damage best and was the most stable; the token cap bounds its O(tokens²) cost per sample.
    "default": CKAConfig(estimator="per_sample", debiased=False, tokens="tokens", max_tokens=1024),
    # The authors' estimator: biased linear CKA per sample over all its tokens, averaged over samples.
    "paper": CKAConfig(estimator="per_sample", debiased=False, tokens="tokens", max_tokens=None),
    # Minibatch CKA (Nguyen, Raghu & Kornblith 2021): HSIC over all tokens of a batch, averaged.
    "minibatch": CKAConfig(estimator="minibatch", debiased=False, tokens="tokens", max_tokens=1024),
}


def saturated_blocks(cka: Tensor, threshold: float = 0.999) -> list[int]:
    """The blocks ``i`` whose input and output have CKA >= ``threshold`` (``cka[i, i + 1]``)."""
    return [i for i in range(cka.shape[0] - 1) if float(cka[i, i + 1]) >= threshold]


def top_direction_share(states: Sequence[Tensor], mask: Tensor | None = None, *, max_tokens: int = 512,
                        generator: torch.Generator | None = None) -> list[float]:
    """Per state, the share of the token variance (centred) along its first principal direction, over
    up to ``max_tokens`` real tokens of the batch (the same tokens for every state). Near 1, one
    direction, usually a few massive activations, carries the state; linear CKA then compares little
    else, and every block looks like the identity."""
    shares = []
    for x in select_examples(states, mask, "tokens", max_tokens=max_tokens, generator=generator):
        x = x.to(torch.float64)
        power = torch.linalg.svdvals(x - x.mean(dim=0)).square()
        total = float(power.sum())
        shares.append(float(power[0]) / total if total > 0 else float("nan"))
    return shares


# What the warning proposes, from the measurements on real pretrained layers (README, "Similarity on
# real pretrained layers"): rms was the CKA setting whose plan costs ranked real damage best; plans
# by measurement (the training loss, the chunk damage) do not rely on the similarity at all.
_REMEDY_CKA = "--cka.token_norm=rms"
_REMEDY_PLAN = ("--plan.method=loss, or keep --plan.refine on (the default: it measures the chunk damage of "
                "every plan of the pool)")


def saturation_warning(stack: str, cka: Tensor, config: CKAConfig, top_direction: Sequence[float] | None = None, *,
                       threshold: float = 0.999, dominance: float = 0.9) -> str | None:
    """A warning when the matrix of ``stack`` cannot rank its blocks: most blocks look like the identity
    (``cka[i, i + 1] >= threshold``), or in most states one principal direction carries at least
    ``dominance`` of the variance (:func:`top_direction_share`). Massive activations are the usual
    cause; the text names the remedies (the rms setting when not in use, and planning by the loss)."""
    saturated = saturated_blocks(cka, threshold)
    blocks = cka.shape[0] - 1
    dominated = [i for i, share in enumerate(top_direction or ()) if share >= dominance]
    states = len(top_direction or ())
    findings = []
    if blocks >= 2 and len(saturated) * 2 > blocks:
        findings.append(f"CKA between the input and output of {len(saturated)} of its {blocks} blocks is >= "
                        f"{threshold} (blocks {saturated})")
    if states >= 2 and len(dominated) * 2 > states:
        findings.append(f"in {len(dominated)} of its {states} residual states one principal direction carries "
                        f">= {dominance:.0%} of the variance (states {dominated})")
    if not findings:
        return None
    remedies = ([_REMEDY_CKA] if config.token_norm == "none" else []) + [_REMEDY_PLAN]
    return (f"stack {stack}: {' and '.join(findings)}, so its CKA cannot rank the blocks; massive activations "
            f"(a few hidden dimensions or sink tokens far larger than the rest) usually cause this. Try "
            f"{' or '.join(remedies)}")


# ---------------------------------------------------------------------------------------- streaming
class StreamingCKA:
    """CKA matrix between ``num_states`` states, accumulated batch by batch in constant memory.

    Keeps a (num_states, num_states) float64 sum (of HSIC matrices for the minibatch estimator, of
    per-sample CKA matrices for the per-sample one), the number of terms in it and the number of
    examples seen. Token subsampling uses a generator seeded once from ``config.seed``.
    """

    def __init__(self, num_states: int, config: CKAConfig = CKAConfig()) -> None:
        if num_states < 1:
            raise ValueError(f"num_states={num_states} must be >= 1 (a stack of L blocks has L+1 states)")
        self.num_states = num_states
        self.config = config
        self._sum = torch.zeros(num_states, num_states, dtype=torch.float64)
        self._count = 0
        self._num_examples = 0
        self._generator = torch.Generator().manual_seed(config.seed)

    @property
    def num_updates(self) -> int:
        """Terms in the average: batches (minibatch estimator) or samples (per-sample estimator)."""
        return self._count

    @property
    def num_examples(self) -> int:
        """Total examples (rows) the HSIC terms were computed on."""
        return self._num_examples

    def update(self, states: Sequence[Tensor], mask: Tensor | None = None) -> None:
        """Fold one batch in: ``states`` is one (batch, tokens, D_i) or (batch, D_i) tensor per state."""
        if len(states) != self.num_states:
            raise ValueError(f"expected {self.num_states} states (one per residual state), got {len(states)}")
        cfg = self.config
        tokens = all(s.dim() == 3 for s in states)
        if cfg.skip_tokens:
            if not tokens:
                raise ValueError("skip_tokens needs (batch, tokens, hidden) states: (batch, hidden) states have "
                                 "no tokens to skip")
            mask = skip_leading_tokens(_valid_tokens(states, mask), cfg.skip_tokens)
        if cfg.estimator == "minibatch":
            examples = select_examples(states, mask, cfg.tokens, max_tokens=cfg.max_tokens,
                                       generator=self._generator)
            examples = condition_examples(examples, cfg.token_norm, cfg.feature_norm)
            self._sum += _hsic_matrix(examples, debiased=cfg.debiased).cpu()
            self._count += 1
            self._num_examples += examples[0].shape[0]
            return
        if not tokens:
            raise ValueError("the per_sample estimator needs (batch, tokens, hidden) states; "
                             "use estimator='minibatch' for (batch, hidden) states")
        valid = _valid_tokens(states, mask)
        for b in range(valid.shape[0]):
            examples = select_examples([s[b : b + 1] for s in states], valid[b : b + 1], "tokens",
                                       max_tokens=cfg.max_tokens, generator=self._generator)
            examples = condition_examples(examples, cfg.token_norm, cfg.feature_norm)
            cka = _normalize(_hsic_matrix(examples, debiased=cfg.debiased)).cpu()
            if cka.isnan().any():
                logger.warning("sample %d of the batch has constant states; its CKA entries are nan", b)
            self._sum += cka
            self._count += 1
            self._num_examples += examples[0].shape[0]

    def compute(self) -> Tensor:
        """The (num_states, num_states) float64 CKA matrix: symmetric, unit diagonal, nan where undefined."""
        if self._count == 0:
            raise ValueError("StreamingCKA.compute() called before any update(); feed at least one batch")
        mean = self._sum / self._count
        cka = _normalize(mean) if self.config.estimator == "minibatch" else (mean + mean.T) / 2
        undefined = cka.diagonal().isnan().nonzero().flatten().tolist()
        if undefined:
            logger.warning("states %s have zero self-HSIC (constant over the calibration data); "
                           "their CKA entries are nan", undefined)
        return cka

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Sum the accumulator state over all processes of ``group`` (every rank must call it).

        Call it once, after the last update, on every rank with the same ``num_states``. Afterwards
        every rank holds the totals, and compute() equals one process having seen all batches (the
        minibatch estimator needs whole batches per process). A no-op without an initialised
        process group. With token subsampling, ranks draw different subsamples than one process would.
        """
        counts = torch.tensor([self._count, self._num_examples], dtype=torch.float64)
        packed = _all_reduce_sum(torch.cat([self._sum.flatten(), counts]), group)  # one collective
        if packed is None:
            return
        self._sum = packed[:-2].reshape(self.num_states, self.num_states).clone()
        self._count = round(float(packed[-2]))
        self._num_examples = round(float(packed[-1]))


def _all_reduce_sum(packed: Tensor, group: ProcessGroup | None) -> Tensor | None:
    """SUM-all-reduce a float64 CPU tensor (on the current GPU under nccl); None when not distributed."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        logger.debug("torch.distributed is not initialised; all_reduce is a no-op")
        return None
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    packed = packed.to(torch.float64).to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed.cpu()


# ------------------------------------------------------------------------------------------ cosine
class StreamingCosine:
    """Mean cosine similarity between states, token by token: ``C_ij = mean_t cos(h_i[t], h_j[t])``.

    Not CKA: it compares the same token's vectors across states, which is what ShortGPT's block
    influence (Men et al. 2024, BI_i = 1 − C_{i,i+1}) and the angular distance of Gromov et al.
    (2024, arccos(C_{l,l+n}) / π) use. Every real token counts (padding never); memory is one
    (S, S) float64 sum and a token count, and ``all_reduce`` sums them across processes.
    """

    def __init__(self, num_states: int) -> None:
        if num_states < 1:
            raise ValueError(f"num_states={num_states} must be >= 1")
        self.num_states = num_states
        self._sum = torch.zeros(num_states, num_states, dtype=torch.float64)
        self._tokens = 0

    def update(self, states: Sequence[Tensor], mask: Tensor | None = None) -> None:
        """Fold one batch in: one (batch, tokens, D) tensor per state (same D), ``mask`` True = real."""
        if len(states) != self.num_states:
            raise ValueError(f"expected {self.num_states} states (one per residual state), got {len(states)}")
        rows = select_examples(states, mask, "tokens")  # all real tokens, same rows for every state
        unit = torch.stack([torch.nn.functional.normalize(r.to(torch.float64), dim=-1) for r in rows])  # (S, n, D)
        self._sum += torch.einsum("snd,tnd->st", unit, unit).cpu()
        self._tokens += unit.shape[1]

    def compute(self) -> Tensor:
        """(S, S) float64 mean cosine."""
        if self._tokens == 0:
            raise ValueError("StreamingCosine.compute() called before any update(); feed at least one batch")
        return self._sum / self._tokens

    def all_reduce(self, group: ProcessGroup | None = None) -> None:
        """Sum the state over all processes (a no-op without an initialised process group)."""
        packed = _all_reduce_sum(torch.cat([self._sum.flatten(), torch.tensor([float(self._tokens)])]), group)
        if packed is None:
            return
        self._sum = packed[:-1].reshape(self.num_states, self.num_states)
        self._tokens = round(float(packed[-1]))
