"""The speed table of the README: full vs pruned policies, measured side by side.

Each row is one ``vlaprune bench`` run in a fresh process (one model pair in memory at a time):
the full policy and a policy pruned in memory by a plan (cka-dp from synthetic calibration, no
refine: timing does not need trained weights), alternating A B A B after a warm-up, median of
``--rounds``. ``first-k`` is LeRobot's own truncation (SmolVLA's ``num_vlm_layers``), for comparison.

    python benchmarks/speed.py [--policies real:smolvla] [--ratios 0.25 0.5] [--rounds 3] [--device cpu]
        [--trainable default|expert|all] [--train_batch_size 2] [--stacks vision vlm expert] [--out speed.json]

``--stacks`` names the stacks the ratio applies to (``--plan.stacks``; default: the family's default
ones, so SmolVLA's vision encoder stays whole unless named).

The README's CPU rows: ``--policies real:smolvla`` (SmolVLA's default trainable set is already the
expert) and ``--policies real:pi0 real:pi05 --trainable expert --train_batch_size 1`` (pi0 trains
everything by default: 4B parameters plus AdamW states do not fit 24 GB), and ``--policies real:groot
--train_batch_size 0`` (inference only: a float32 training step of GR00T N1.7's default trainable set,
1.6B parameters, went past 24 GB). Prints a markdown table
(with the machine) and a final JSON line. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROWS_FIRST_K = {"real:smolvla", "tiny:smolvla"}  # families whose config can truncate natively


def _key(policy: str, ratio: float, method: str) -> str:
    return f"{policy}|{ratio}|{method}"


def run(policy: str, ratio: float, method: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [str(Path(sys.executable).with_name("vlaprune")), "bench", f"--policy.path={policy}",
               f"--policy.device={args.device}", f"--ratio={ratio}", f"--plan.method={method}",
               f"--rounds={args.rounds}", f"--dtype={args.dtype}", f"--train_batch_size={args.train_batch_size}",
               f"--trainable={args.trainable}", f"--out={out}"]
        if args.stacks:
            cmd.append(f"--plan.stacks=[{', '.join(args.stacks)}]")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else "failed"
            raise RuntimeError(f"{' '.join(cmd)} {why}:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["real:smolvla"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--trainable", default="default", choices=["default", "expert", "all"])
    parser.add_argument("--stacks", nargs="+", help="the stacks pruned (default: the family's default ones)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    # each row is saved as soon as it is measured; a rerun with the same settings and --out reuses
    # the rows already there (a 10-minute pi0 row is not lost to a later failure)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("policies", "ratios", "out")}
    done: dict[str, dict] = {}
    if args.out and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("settings") == settings:
            done = {_key(r["policy"], r["requested_ratio"], r["method"]): r for r in previous["rows"]}
    wanted = [(policy, ratio, "cka-dp") for policy in args.policies for ratio in args.ratios]
    wanted += [(policy, max(args.ratios), "first-k") for policy in args.policies if policy in ROWS_FIRST_K]
    rows, failed = [], []
    for policy, ratio, method in wanted:
        row = done.get(_key(policy, ratio, method))
        if row is None:
            try:
                row = run(policy, ratio, method, args)
            except RuntimeError as err:
                print(err, file=sys.stderr)
                failed.append(f"{policy} {method} {ratio}")
                continue
            row["requested_ratio"] = ratio
        rows.append(row)
        if args.out:
            args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))

    machine = rows[0]["machine"] if rows else "?"
    print(f"\nMachine: {machine}; {args.dtype}; median of {args.rounds} alternating rounds; training step: "
          f"{args.trainable} trainable set, batch {args.train_batch_size}\n")
    print("| policy | plan | depth kept | action chunk s (full → pruned) | ratio | ideal | efficiency "
          "| train step s (full → pruned) | ratio | ideal | efficiency | chunk FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = ", ".join(f"{name} {len(k)}" for name, k in r["kept"].items())
        train = "- | - | - | -"
        if "train_step_ratio" in r:
            train = (f"{r['full']['train_step_s']:.2f} → {r['pruned']['train_step_s']:.2f} | "
                     f"{r['train_step_ratio']:.2f} | {r['ideal_train_ratio']:.2f} | {r['train_efficiency']:.2f}")
        print(f"| {r['policy']} | {r['method']} | {kept} | {r['full']['chunk_s']:.2f} → {r['pruned']['chunk_s']:.2f} "
              f"| {r['inference_ratio']:.2f} | {r['ideal_inference_ratio']:.2f} | {r['inference_efficiency']:.2f} "
              f"| {train} | {r['flop_inference_ratio']:.2f} |")
    print(json.dumps({"machine": machine, "settings": settings, "rows": rows, "failed": failed}))
    if failed:
        raise SystemExit(f"rows that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
