"""Command line: ``vlaprune <command> --flag.sub=value ...`` (LeRobot-style flags, parsed by draccus).

The CLI only parses, configures logging, owns the progress bar and prints; the work is done by
entry-point functions that take a config object.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlaprune.pipelines.config import AnalyzeConfig

COMMANDS = {
    "analyze": "one calibration pass → per-stack CKA matrices, heatmaps and analysis.json",
    "prune": "analyse, plan, remove blocks, verify → a pruned LeRobot checkpoint with prune_manifest.json",
    "bench": "full vs pruned in one process: training step, action chunk, memory, FLOPs, measured ceiling",
}


def _usage() -> str:
    lines = ["usage: vlaprune <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "examples:",
              "  vlaprune analyze --policy.path=tiny:pi0 --dataset.repo_id=synthetic --out=/tmp/x",
              "  vlaprune prune --policy.path=tiny:smolvla --dataset.repo_id=synthetic --ratio=0.5 --out=/tmp/p"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vlaprune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"analyze": _analyze, "prune": _prune, "bench": _bench}[command](rest)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vlaprune {command}: error: {err}", file=sys.stderr)
        return 1


def _analyze(args: list[str]) -> int:
    import draccus
    from tqdm import tqdm

    from vlaprune.io.report import adjacent_table
    from vlaprune.pipelines.analyze import run_analyze
    from vlaprune.pipelines.config import AnalyzeConfig

    cfg = draccus.parse(config_class=AnalyzeConfig, args=args)
    rank = _init_distributed(cfg)
    total = len(cfg.calibration.calibration().batch_sizes)
    quiet = rank != 0 or not sys.stderr.isatty()
    with tqdm(total=total, desc="calibration batches", unit="batch", disable=quiet) as bar:
        analysis = run_analyze(cfg, on_batch=bar.update)
    if rank != 0:
        return 0
    print(adjacent_table(analysis))
    print(f"\nwrote {cfg.out}/analysis.json and {len(analysis.stacks)} heatmap(s) in {analysis.seconds:.1f} s")
    return 0


def _prune(args: list[str]) -> int:
    import draccus
    from tqdm import tqdm

    from vlaprune.families import family_for
    from vlaprune.io.report import prune_summary
    from vlaprune.pipelines.config import PruneConfig
    from vlaprune.pipelines.prune import run_prune

    cfg = draccus.parse(config_class=PruneConfig, args=args)
    total = len(cfg.calibration.calibration().batch_sizes)
    with tqdm(total=total, desc="calibration batches", unit="batch", disable=not sys.stderr.isatty()) as bar:
        result = run_prune(cfg, on_batch=bar.update)
    print(prune_summary(result.manifest))
    print(f"\nwrote {result.out} ({family_for(result.manifest.family).load_hint.format(path=result.out)})")
    return 0


def _bench(args: list[str]) -> int:
    import json

    import draccus
    from tqdm import tqdm

    from vlaprune.io.report import bench_table
    from vlaprune.pipelines.bench import run_bench
    from vlaprune.pipelines.config import BenchConfig

    cfg = draccus.parse(config_class=BenchConfig, args=args)
    with tqdm(total=cfg.rounds, desc="A/B rounds", unit="round", disable=not sys.stderr.isatty()) as bar:
        result = run_bench(cfg, on_round=bar.update)
    print(f"{result['policy']} vs {result['pruned_path'] or 'in-memory ' + result['method'] + ' plan'} "
          f"on {result['machine']}, {result['dtype']}, median of {result['rounds']}")
    print(bench_table(result))
    line = json.dumps(result)
    if cfg.out:
        from pathlib import Path

        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(line + "\n")
    print(line)
    return 0


def _init_distributed(cfg: AnalyzeConfig) -> int:
    """Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1): join the process group and put
    each rank on its own GPU; the calibration batches are then split across ranks. Returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cfg.policy.device.startswith("cuda") else "gloo")
    if cfg.policy.device == "cuda":
        cfg.policy.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return dist.get_rank()


if __name__ == "__main__":
    sys.exit(main())
