"""``make demo`` (``python -m vlaprune.studies.demo``): the whole job on real trained weights, offline, in minutes.

A shipped trained model (default ``metaworld:smolvla``: SmolLM2 and DINOv2 weights, pretrained on
42 MetaWorld tasks; ``--policy metaworld:smolvla-small`` is the fast small one, see
:mod:`vlaprune.models.shipped`) →

1. ``analyze``: one calibration pass on demonstrations of its held-out tasks, CKA heatmaps;
2. ``prune`` to half depth (``cka-dp``), verified against the source with the removed blocks skipped;
3. ``bench``: the full and the pruned policy timed side by side (training step, action chunk);
4. the same short ``lerobot-train`` fine-tuning of both on the held-out demonstrations;
5. closed-loop success of both on the held-out tasks (evaluation positions no demonstration uses).

The fine-tuning and evaluation defaults are the model's demo recipe (``ShippedModel.demo``), sized to
about ten minutes on two CPU cores: far shorter than the quality study's, so the successes show the
workflow, not the quality (the README's study does). Everything is written to ``<out>.partial`` and
renamed to ``<out>`` at the end (default ``outputs/demo``): ``analysis/``, ``pruned/``,
``bench.json``, ``finetune/``, ``results.json`` (``success_full``, ``success_pruned``, speed, plan)
and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    from vlaprune.models import shipped

    parser = argparse.ArgumentParser(prog="python -m vlaprune.studies.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default=shipped.SPEC, choices=tuple(shipped.MODELS), help="the shipped model")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of blocks removed per stack")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps, the same for both policies (default: the model's demo recipe)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the demo recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the demo recipe's")
    parser.add_argument("--episodes", type=int, default=None,
                        help="evaluation episodes per held-out task (default: the demo recipe's)")
    parser.add_argument("--max_steps", type=int, default=200, help="environment steps before an episode fails")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="lerobot-train's data-loading workers; 0 loads in the training process (a worker takes "
                             "about 15 s to start, worth it only over many steps)")
    args = parser.parse_args(argv)
    recipe = shipped.get(args.policy).demo
    for name, field in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("episodes", "eval_episodes")):
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, field))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = args.out.with_name(args.out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    results = run(args, tmp)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"\n{summary_table(results)}\n\nreport: {args.out / 'report.md'}, results: {args.out / 'results.json'}")
    return 0


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from vlaprune.io.provenance import machine_description
    from vlaprune.io.report import prune_summary
    from vlaprune.models import shipped
    from vlaprune.models.loading import load_policy
    from vlaprune.pipelines.analyze import run_analyze
    from vlaprune.pipelines.bench import run_bench
    from vlaprune.pipelines.config import AnalyzeConfig, BenchConfig, DatasetArgs, PolicyArgs, PruneConfig, PrunedArgs
    from vlaprune.pipelines.prune import run_prune
    from vlaprune.studies import metaworld as mw
    from vlaprune.studies.train import lerobot_train

    start = time.perf_counter()
    model = shipped.get(args.policy)
    mw.check_tasks(model.held_out)  # fails early, naming what to install, if MetaWorld is missing
    policy = PolicyArgs(path=model.spec, device=args.device)
    data = DatasetArgs(repo_id=shipped.CALIBRATION_REPO_ID, root=str(model.calibration_root))
    seconds: dict[str, float] = {}

    with _stage("1/5 analyze: calibration pass, CKA per stack", seconds):
        run_analyze(AnalyzeConfig(policy=policy, dataset=data, out=str(out / "analysis")))
    with _stage(f"2/5 prune: the default plan, {args.ratio:.0%} of each stack", seconds):
        pruned = run_prune(PruneConfig(policy=policy, dataset=data, ratio=args.ratio,
                                       analysis=str(out / "analysis" / "analysis.json"), out=str(out / "pruned")))
    with _stage("3/5 bench: full vs pruned, alternated", seconds):
        bench = run_bench(BenchConfig(policy=policy, pruned=PrunedArgs(path=str(out / "pruned")), dataset=data,
                                      train_batch_size=args.batch_size, rounds=5))
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
    runs = {}
    with _stage(f"4/5 fine-tune: lerobot-train, {args.steps} steps each at batch {args.batch_size}", seconds):
        for name, checkpoint in (("full", shipped.policy_dir(model.spec)), ("pruned", out / "pruned")):
            runs[name] = lerobot_train(checkpoint, repo_id=data.repo_id or "", root=model.calibration_root,
                                       out=out / "finetune" / name, steps=args.steps, batch_size=args.batch_size,
                                       seed=args.seed, device=args.device, lr=args.lr,
                                       num_workers=args.num_workers)
    evaluations = {}
    with _stage(f"5/5 closed-loop success: {args.episodes} episodes per held-out task, each policy", seconds):
        for name, run_ in runs.items():
            bundle = load_policy(str(run_.checkpoint), device=args.device)
            evaluations[name] = mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor,
                                            model.held_out, episodes_per_task=args.episodes,
                                            image_size=model.image_size, max_steps=args.max_steps, seed=args.seed,
                                            batch_size=10, progress=False)

    results = {
        "policy": model.spec, "held_out_tasks": list(model.held_out), "ratio": args.ratio,
        "success_full": evaluations["full"]["success_rate"], "success_pruned": evaluations["pruned"]["success_rate"],
        "success_per_task": {name: {t: r["success_rate"] for t, r in e["tasks"].items()}
                             for name, e in evaluations.items()},
        "episodes_per_task": args.episodes, "finetune_steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed,
        "plan": {name: {"kept": list(s.kept_original), "removed_count": len(s.removed),
                        "source_num_layers": s.source_num_layers} for name, s in pruned.manifest.stacks.items()},
        "parameters": pruned.manifest.parameters,
        "speed": {"chunk_s": {n: bench[n]["chunk_s"] for n in ("full", "pruned")},
                  "train_step_s": {n: bench[n]["train_step_s"] for n in ("full", "pruned")},
                  "inference_ratio": bench["inference_ratio"], "train_step_ratio": bench["train_step_ratio"]},
        "finetune": {name: r.to_json() for name, r in runs.items()},
        "evaluation": evaluations,
        "stage_seconds": seconds, "total_seconds": time.perf_counter() - start,
        "machine": machine_description(args.device),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(report(results, prune_summary(pruned.manifest)))
    return results


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """Announce a stage and record in ``seconds`` how long it took."""
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    print(f"[demo] {name}: {seconds[name]:.0f} s", flush=True)


def summary_table(r: dict[str, Any]) -> str:
    p, s = r["parameters"], r["speed"]
    ft = r["finetune"]

    def step(name: str) -> str:
        return f"{ft[name]['update_s']:.3f} s" if ft[name]["update_s"] is not None else "–"

    rows = [
        ("success on held-out tasks", f"{r['success_full']:.0%}", f"{r['success_pruned']:.0%}"),
        *[(f"  {task}", f"{r['success_per_task']['full'][task]:.0%}", f"{r['success_per_task']['pruned'][task]:.0%}")
          for task in r["held_out_tasks"]],
        ("blocks (VLM + expert)", " + ".join(str(v["source_num_layers"]) for v in r["plan"].values()),
         " + ".join(str(len(v["kept"])) for v in r["plan"].values())),
        ("parameters", f"{p['source']['total'] / 1e6:.2f} M", f"{p['pruned']['total'] / 1e6:.2f} M"),
        ("action chunk (bench)", f"{s['chunk_s']['full'] * 1e3:.1f} ms",
         f"{s['chunk_s']['pruned'] * 1e3:.1f} ms (× {s['inference_ratio']:.2f})"),
        (f"training step, batch {r['batch_size']} (bench)", f"{s['train_step_s']['full'] * 1e3:.0f} ms",
         f"{s['train_step_s']['pruned'] * 1e3:.0f} ms (× {s['train_step_ratio']:.2f})"),
        ("lerobot-train update per step", step("full"), step("pruned")),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':<{width}}  {'full':>12}  {'pruned':>12}"]
    lines += [f"{a:<{width}}  {b:>12}  {c:>12}" for a, b, c in rows]
    lines.append(f"({r['finetune_steps']} fine-tuning steps each, {r['episodes_per_task']} episodes per task, "
                 f"{r['machine']}; {r['total_seconds']:.0f} s in all)")
    return "\n".join(lines)


def report(r: dict[str, Any], plan_text: str) -> str:
    return "\n".join([
        f"# vlaprune demo: {r['policy']}, full vs pruned", "",
        f"Held-out tasks (never seen in pretraining): {', '.join(r['held_out_tasks'])}. Both policies were "
        f"fine-tuned with lerobot-train for {r['finetune_steps']} steps at batch {r['batch_size']} and evaluated "
        f"closed-loop on {r['episodes_per_task']} episodes per task (a small sample: see the quality study in the "
        "README for seeds and spread).", "",
        "```", summary_table(r), "```", "",
        "## Plan", "", "```", plan_text, "```", "",
        "## CKA heatmaps (calibration on the held-out demonstrations)", "",
        "![VLM](analysis/cka_vlm.png) ![expert](analysis/cka_expert.png)", "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
