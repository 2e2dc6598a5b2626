"""How much does capture + streaming CKA add to the calibration forward passes, and does memory stay flat?

Builds ``real:smolvla`` (SmolVLM2-500M shapes, random weights, offline), then in ONE process times
the same calibration passes (prefix once + the expert at each flow timestep, same seeded noise)
without capture (A) and with capture and CKA accumulation (B), alternating A B A B after a warm-up,
and reports the median ratio B/A. Peak memory: child processes run the capture over 1×, 2× and 4×
the batches and report their peak RSS; flat means the growth is noise, not proportional.

    python benchmarks/analyze_overhead.py [--policy real:smolvla] [--samples 32] [--rounds 2]

Prints a table and a final JSON line. Time it on a quiet machine: another job on the cores skews it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlaprune.core.capture import CaptureConfig
from vlaprune.core.cka import CKAConfig
from vlaprune.families import family_for
from vlaprune.io.calibration import CalibrationConfig, synthetic_batches
from vlaprune.io.provenance import machine_description
from vlaprune.models.loading import load_policy
from vlaprune.pipelines.planning import compute_stack_cka


def batches_for(bundle: Any, samples: int, batch_size: int) -> list[dict[str, Any]]:
    cfg = CalibrationConfig(num_samples=samples, batch_size=batch_size, seed=0)
    return [bundle.preprocessor(b) for b in synthetic_batches(bundle.policy.config, cfg)]


@torch.no_grad()
def plain_passes(policy: Any, batches: list[dict[str, Any]], capture: CaptureConfig) -> None:
    """The calibration forward passes exactly as capture runs them, with no hooks and no CKA."""
    family = family_for(policy)
    runner = family.runner
    assert runner is not None
    gen = torch.Generator().manual_seed(capture.seed)
    for batch in batches:
        prefix = runner.prefix(policy, batch)
        actions = prefix.actions.float()
        noise = torch.randn(actions.shape, generator=gen)
        for t in capture.timesteps:
            time_ = torch.full((actions.shape[0],), t)
            runner.expert(policy, prefix, t * noise + (1 - t) * actions, time_)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(policy_spec: str, samples: int, batch_size: int) -> None:
    bundle = load_policy(policy_spec)
    batches = batches_for(bundle, batch_size, batch_size)  # one batch preprocessed, reused
    before = peak_rss_mb()
    repeat = samples // batch_size
    compute_stack_cka(bundle.policy, (batches[0] for _ in range(repeat)), cka=CKAConfig(),
                      capture=CaptureConfig())
    print(json.dumps({"samples": samples, "peak_rss_mb_before": before, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="real:smolvla")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.policy, args.child, args.batch_size)
        return

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bundle = load_policy(args.policy)
    policy = bundle.policy
    params = sum(p.numel() for p in policy.parameters())
    build_s = time.perf_counter() - t0
    batches = batches_for(bundle, args.samples, args.batch_size)
    capture, cka = CaptureConfig(), CKAConfig()

    def run_plain() -> float:
        start = time.perf_counter()
        plain_passes(policy, batches, capture)
        return time.perf_counter() - start

    def run_capture() -> float:
        start = time.perf_counter()
        compute_stack_cka(policy, batches, cka=cka, capture=capture)
        return time.perf_counter() - start

    plain_passes(policy, batches[:1], capture)  # warm-up
    plain, captured = [], []
    for _ in range(args.rounds):
        plain.append(run_plain())
        captured.append(run_capture())
    ratio = statistics.median(captured) / statistics.median(plain)

    memory = []
    for factor in (1, 2, 4):
        samples = args.batch_size * factor
        out = subprocess.run(
            [sys.executable, __file__, "--policy", args.policy, "--batch-size", str(args.batch_size),
             "--child", str(samples)],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        memory.append(json.loads(out))

    machine = machine_description()
    print(f"\n{args.policy}: {params / 1e6:.0f}M parameters, built in {build_s:.1f} s; {machine}")
    print(f"{args.samples} synthetic calibration samples, batch {args.batch_size}, "
          f"expert at t={list(capture.timesteps)}, CKA {cka}")
    print(f"{'run':<28}{'median s':>10}{'all runs (s)':>30}")
    print(f"{'forward passes only':<28}{statistics.median(plain):>10.2f}{[round(x, 2) for x in plain]!s:>30}")
    print(f"{'analyze (capture + CKA)':<28}{statistics.median(captured):>10.2f}"
          f"{[round(x, 2) for x in captured]!s:>30}")
    print(f"ratio analyze / forward: {ratio:.3f}  (target <= 1.10)")
    print(f"{'samples':>8}{'peak RSS MB':>14}")
    for row in memory:
        print(f"{row['samples']:>8}{row['peak_rss_mb']:>14.0f}")
    print(json.dumps({
        "policy": args.policy, "machine": machine, "samples": args.samples, "batch_size": args.batch_size,
        "forward_s": plain, "analyze_s": captured, "overhead_ratio": round(ratio, 4),
        "peak_rss_mb": {str(r["samples"]): round(r["peak_rss_mb"]) for r in memory},
    }))


if __name__ == "__main__":
    main()
