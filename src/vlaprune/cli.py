"""Command line: ``vlaprune <command> --flag.sub=value ...`` (LeRobot-style flags, parsed by draccus).

The CLI only parses, configures logging, owns the progress bar and prints; the work is done by
entry-point functions that take a config object.
"""

from __future__ import annotations

import logging
import sys

COMMANDS = {"analyze": "one calibration pass → per-stack CKA matrices, heatmaps and analysis.json"}


def _usage() -> str:
    lines = ["usage: vlaprune <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "example: vlaprune analyze --policy.path=tiny:pi0 --dataset.repo_id=synthetic --out=/tmp/x"]
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
        return _analyze(rest)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"vlaprune {command}: error: {err}", file=sys.stderr)
        return 1


def _analyze(args: list[str]) -> int:
    import draccus
    from tqdm import tqdm

    from .analyze import run_analyze
    from .config import AnalyzeConfig
    from .report import adjacent_table

    cfg = draccus.parse(config_class=AnalyzeConfig, args=args)
    total = len(cfg.calibration.calibration().batch_sizes)
    with tqdm(total=total, desc="calibration batches", unit="batch", disable=not sys.stderr.isatty()) as bar:
        analysis = run_analyze(cfg, on_batch=bar.update)
    print(adjacent_table(analysis))
    print(f"\nwrote {cfg.out}/analysis.json and {len(analysis.stacks)} heatmap(s) in {analysis.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
