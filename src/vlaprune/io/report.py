"""Pictures and tables of an analysis: one CKA heatmap per stack, the most similar adjacent blocks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlaprune.io.analysis import Analysis, StackAnalysis
from vlaprune.io.manifest import Manifest


def plot_cka_heatmap(stack: StackAnalysis, title: str, path: Path) -> None:
    """(L+1)×(L+1) CKA heatmap; tick i is the residual stream after i blocks (0 = stack input)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(stack.cka, dtype=float)
    n = matrix.shape[0]
    side = max(5.0, 1.5 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), dpi=120)
    finite = matrix[np.isfinite(matrix)]
    # scale to the data: in deep stacks every CKA can sit above 0.9, and a 0-1 scale hides the structure
    vmin = float(np.floor(finite.min() * 100) / 100) if finite.size else 0.0
    image = ax.imshow(matrix, cmap="magma", vmin=min(vmin, 0.99), vmax=1.0, origin="upper")
    ticks = list(range(n))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel("residual state (0 = stack input, i = output of block i-1)")
    ax.set_ylabel("residual state")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def heatmap_title(analysis: Analysis, stack: str) -> str:
    cka = analysis.settings["cka"]
    timesteps = analysis.settings["capture"]["timesteps"]
    est = f"{cka['estimator']}, {'debiased' if cka['debiased'] else 'biased'}, tokens={cka['tokens']}"
    when = f", flow t={timesteps}" if stack in analysis.structure.get("expert_stacks", []) else ""
    source = analysis.calibration.get("source", "?")
    return (
        f"{analysis.policy} — {stack} ({analysis.stacks[stack].num_layers} blocks)\n"
        f"CKA {est}{when}; {analysis.calibration.get('num_samples', '?')} samples from {source}"
    )


def adjacent_table(analysis: Analysis, top: int = 5) -> str:
    """Per stack, the blocks whose input and output are most alike (candidates for removal)."""
    lines = []
    for name, stack in analysis.stacks.items():
        ranked = sorted(stack.adjacent(), key=lambda item: -item[1])[:top]
        lines.append(f"{name} ({stack.num_layers} blocks): most similar input/output")
        lines.append(f"  {'block':>5}  {'CKA(in, out)':>12}  {'1 - CKA':>9}")
        lines.extend(f"  {block:>5}  {value:>12.6f}  {1 - value:>9.2e}" for block, value in ranked)
    return "\n".join(lines)


def write_analysis(analysis: Analysis, directory: Path) -> list[Path]:
    """``analysis.json`` and ``cka_<stack>.png`` per stack into ``directory``; returns the files."""
    files = []
    data: dict[str, Any] = analysis.to_json()
    json_path = directory / "analysis.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    files.append(json_path)
    for name, stack in analysis.stacks.items():
        png = directory / f"cka_{name}.png"
        plot_cka_heatmap(stack, heatmap_title(analysis, name), png)
        files.append(png)
    return files


def prune_summary(manifest: Manifest) -> str:
    """The plan per stack, the candidates weighed, sizes and the FLOP-predicted speed-up."""
    lines = [f"{manifest.source} ({manifest.family}) → {manifest.policy_type}, plan: {manifest.method}"]
    for name, stack in manifest.stacks.items():
        lines.append(f"  {name:<8} keep {len(stack.kept):>2}/{stack.source_num_layers:<2} {list(stack.kept)}  "
                     f"removed {list(stack.removed)}")
    signal = next((c.get("signal") for c in manifest.candidates if c.get("signal")), None)
    lines.append(f"  {'method':<10}{'cka-dp cost':>12}{'damage':>10}{'loss incr.':>12}"
                 + (f"   (refined by {signal.replace('_', ' ')})" if signal else ""))
    for cand in manifest.candidates:
        damage = "-" if cand.get("damage") is None else f"{cand['damage']:.4f}"
        loss = "-" if cand.get("loss_increase") is None else f"{cand['loss_increase']:+.4f}"
        mark = "  <- chosen" if cand.get("chosen") else ""
        seed = cand.get("details", {}).get("seed")
        label = cand["method"] if seed is None else f"{cand['method']} s{seed}"
        also = cand.get("details", {}).get("also")
        same = f"  (also {', '.join(also)})" if also else ""
        lines.append(f"  {label:<10}{cand['cost']:>12.4f}{damage:>10}{loss:>12}{mark}{same}")
    params, flops = manifest.parameters, manifest.chunk_linear_flops
    lines.append(
        f"parameters {params['source']['total'] / 1e6:.2f}M → {params['pruned']['total'] / 1e6:.2f}M; "
        f"linear FLOPs of one action chunk {flops['source'] / 1e9:.3g} → {flops['pruned'] / 1e9:.3g} GFLOP "
        f"(predicted time ratio {flops['predicted_time_ratio']:.2f})"
    )
    verify = manifest.verify
    lines.append(f"verified against the source with the removed blocks skipped: max |diff| loss "
                 f"{verify['loss_max_abs_diff']:.2e}, action chunk {verify['chunk_max_abs_diff']:.2e}")
    if manifest.removed_nothing():
        lines.append("no block was removed: this checkpoint computes exactly what its source computes")
    return "\n".join(lines)


def bench_table(result: Mapping[str, Any]) -> str:
    """A readable table of one comparison."""
    full, pruned = result["full"], result["pruned"]
    width = max(28, *(len(f"  chunk linear GFLOP, {part}") + 1 for part in full["chunk_linear_flops_by_part"]))
    lines = [f"{'':<{width}}{'full':>12}{'pruned':>12}{'ratio':>8}{'ideal':>8}{'effic.':>8}"]

    def row(label: str, a: float, b: float, ratio: float | None = None, ideal: float | None = None,
            eff: float | None = None, fmt: str = "{:>12.3f}") -> None:
        cells = [fmt.format(a), fmt.format(b)]
        extra = "".join(f"{v:>8.3f}" if v is not None else f"{'':>8}" for v in (ratio, ideal, eff))
        lines.append(f"{label:<{width}}{cells[0]}{cells[1]}{extra}")

    row("action chunk (s)", full["chunk_s"], pruned["chunk_s"], result["inference_ratio"],
        result["ideal_inference_ratio"], result["inference_efficiency"])
    if "train_step_ratio" in result:
        row("training step (s)", full["train_step_s"], pruned["train_step_s"], result["train_step_ratio"],
            result["ideal_train_ratio"], result["train_efficiency"])
        row("train peak mem. (+MB)", full["train_peak_mb"], pruned["train_peak_mb"], fmt="{:>12.0f}")
    row("chunk peak mem. (+MB)", full["chunk_peak_mb"], pruned["chunk_peak_mb"], fmt="{:>12.0f}")
    row("parameters (M)", full["parameters"]["total"] / 1e6, pruned["parameters"]["total"] / 1e6, fmt="{:>12.1f}")
    row("trainable parameters (M)", full["parameters"]["trainable"] / 1e6,
        pruned["parameters"]["trainable"] / 1e6, fmt="{:>12.1f}")
    for part in full["chunk_linear_flops_by_part"]:
        a, b = full["chunk_linear_flops_by_part"][part], pruned["chunk_linear_flops_by_part"][part]
        row(f"  chunk linear GFLOP, {part}", a / 1e9, b / 1e9, b / a if a else None, fmt="{:>12.2f}")
    row("chunk linear GFLOP, total", full["chunk_linear_flops"] / 1e9, pruned["chunk_linear_flops"] / 1e9,
        result["flop_inference_ratio"], fmt="{:>12.2f}")
    return "\n".join(lines)
