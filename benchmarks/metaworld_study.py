"""Quality study: does a pruned, fine-tuned policy still do the task?

From a shipped pretrained policy (``--policy``: ``metaworld:smolvla``, SmolLM2 and DINOv2 weights
robot-pretrained on 42 MetaWorld tasks, or the small ``metaworld:smolvla-small``), on its held-out
tasks, which pretraining never saw (``vlaprune.models.shipped``):

1. one calibration pass (``vlaprune analyze``) on the held-out demonstrations;
2. prune at each ratio with each method (``vlaprune prune``): ``default`` is what ``vlaprune prune``
   makes when no method is given (its default refinement included); every named method is its plan as
   planned, refinement off; ``random`` draws a new plan per seed; a ``+vision`` suffix
   (``default+vision``) applies the ratio to the vision encoder too;
3. timing, alternated in one process (``vlaprune bench``): the pruned vs the full model's training
   step at the fine-tuning batch size and one action chunk;
4. the training-free point: closed-loop success of every pruned model before fine-tuning;
5. per seed, for the full model and every pruned one: ``lerobot-train`` on the held-out
   demonstrations for the same number of steps, then closed-loop success on the held-out tasks
   (``--eval_episodes`` per task from evaluation positions no demonstration uses; evaluation seed =
   training seed, so within a seed every variant meets the same positions);
6. ``results.json``, ``table.md`` (mean ± standard deviation over seeds) and ``success_vs_depth.png``.

    python benchmarks/metaworld_study.py --policy metaworld:smolvla --out outputs/mw_study_pretrained \
        --ratios 0.5 --methods default first-k random --seeds 0 1 2       # the README's study
    python benchmarks/metaworld_study.py --out outputs/mw_quick --quick    # small model, regression check

Units run in the order of ``Study.units`` (the first seed's fine-tuned variants first).
``--resume_from`` seeds a new ``--out`` with a committed copy of a study's units (settings.json and
records.jsonl), so a study continues on another machine. Resumable: every finished unit (a pruned
checkpoint, a timing, an evaluation) is kept under ``--out`` and a rerun continues from there; an
interrupted ``lerobot-train`` run is removed and redone, so partial work never enters the table. The
settings that decide a unit's result (steps, batch size, episodes, ...) are fixed per ``--out`` (a
rerun with others is refused); seeds, ratios and methods can be added on a rerun. Two variants whose
plans keep the same blocks (e.g. ``default`` and the method it chose) share their units at a seed:
the same checkpoint trained with the same seed and recipe; the record names the unit it shares.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from vlaprune.io.provenance import machine_description
from vlaprune.models import shipped
from vlaprune.models.loading import load_policy
from vlaprune.pipelines.analyze import run_analyze
from vlaprune.pipelines.bench import run_bench
from vlaprune.pipelines.config import (
    AnalyzeConfig,
    BenchConfig,
    DatasetArgs,
    PlanArgs,
    PolicyArgs,
    PruneConfig,
    PrunedArgs,
)
from vlaprune.pipelines.prune import run_prune
from vlaprune.studies import metaworld as mw
from vlaprune.studies.train import lerobot_train

METHODS = ("default", "cka-dp", "cka-run", "first-k", "random")
DEFAULT = "default"  # the plan `vlaprune prune` makes without --plan.method
VISION = "+vision"  # a method's variant that prunes the vision encoder too: --plan.stacks='[vision, vlm, expert]'
PLANNED = (*METHODS, "bi", "angular", "loss")
FULL = "full"
# the settings that decide a unit's result: fixed for one --out
UNIT_SETTINGS = ("policy", "data_root", "data_repo_id", "steps", "batch_size", "lr", "eval_episodes", "max_steps",
                 "device")


def base_method(method: str) -> str:
    """``first-k+vision`` → ``first-k``."""
    return method.removesuffix(VISION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policy", default=shipped.SMALL, choices=tuple(shipped.MODELS),
                        help="the shipped pretrained policy: its held-out tasks and camera size define the study")
    parser.add_argument("--data_root", type=Path, default=None,
                        help="LeRobotDataset of the held-out tasks (calibration and fine-tuning; default: the "
                             "shipped calibration set)")
    parser.add_argument("--data_repo_id", default=shipped.CALIBRATION_REPO_ID)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=(*PLANNED, *(m + VISION for m in PLANNED)),
                        help="default: the plan `vlaprune prune` makes without --plan.method; the others as planned; "
                             f"a {VISION} suffix prunes the vision encoder too, at the same ratio")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps, every variant (default: the "
                        "shipped model's recipe, vlaprune.models.shipped)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--eval_episodes", type=int, default=None, help="per held-out task; default: the recipe's")
    parser.add_argument("--max_steps", type=int, default=200, help="environment steps per episode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timing_rounds", type=int, default=10)
    parser.add_argument("--resume_from", type=Path, default=None,
                        help="a directory with a study's settings.json and records.jsonl (e.g. a committed copy): "
                             "its finished units seed an --out that has none; the settings must match")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite results.json, table.md and the plot from the units recorded in --out")
    parser.add_argument("--quick", action="store_true",
                        help="regression check: seed 0, ratio 0.5, 150 steps, 5 episodes per task")
    args = parser.parse_args()
    model = shipped.get(args.policy)  # its recipe and calibration set give the defaults
    for name in ("steps", "batch_size", "lr", "eval_episodes"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(model.recipe, name))
    if args.data_root is None:
        args.data_root = model.calibration_root
    if args.quick:
        args.seeds, args.ratios, args.steps, args.eval_episodes, args.timing_rounds = [0], [0.5], 150, 5, 5
    study = Study(args)
    if args.report:
        study.check_settings()
        study.write(study.records())
    else:
        study.run()


def _setting(value: Any) -> str:
    """A unit setting as the study records it: a path inside the shipped assets relative to them, so
    that a committed copy of a study resumes in another clone."""
    if isinstance(value, Path) and value.resolve().is_relative_to(shipped.ASSETS_ROOT.resolve()):
        return f"<assets>/{value.resolve().relative_to(shipped.ASSETS_ROOT.resolve())}"
    return str(value)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.records_path = self.out / "records.jsonl"
        self.model = shipped.get(args.policy)
        self.held_out = self.model.held_out
        if not self.held_out:
            raise SystemExit(f"{args.policy} has no held-out tasks chosen yet (benchmarks/testbed_heldout.py "
                             "measures them): nothing to fine-tune and evaluate on")

    # ---- bookkeeping -------------------------------------------------------------------------
    def check_settings(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        source = self.args.resume_from
        if source is not None and not self.records_path.exists():
            for name in ("settings.json", "records.jsonl"):
                if not (source / name).is_file():
                    raise SystemExit(f"--resume_from {source} has no {name}")
            if (self.out / "settings.json").exists():
                raise SystemExit(f"{self.out} already holds a study's settings; --resume_from seeds a new --out")
            shutil.copy(source / "settings.json", self.out / "settings.json")
            shutil.copy(source / "records.jsonl", self.records_path)
        mine = {k: _setting(getattr(self.args, k)) for k in UNIT_SETTINGS}
        path = self.out / "settings.json"
        if path.exists():
            theirs = json.loads(path.read_text())
            differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if differ:
                raise SystemExit(f"{self.out} holds a study with other settings (theirs, yours): {differ}; "
                                 "use another --out or remove it")
        else:
            path.write_text(json.dumps(mine, indent=1))

    def records(self) -> dict[str, dict[str, Any]]:
        """Finished units by key; a torn last line (a crash while writing) is ignored."""
        found: dict[str, dict[str, Any]] = {}
        if self.records_path.exists():
            for line in self.records_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                found[record["key"]] = record
        return found

    def save_record(self, record: dict[str, Any]) -> None:
        text = self.records_path.read_text() if self.records_path.exists() else ""
        if text and not text.endswith("\n"):  # drop a torn line
            text = text[: text.rfind("\n") + 1]
        tmp = self.records_path.with_suffix(".tmp")
        tmp.write_text(text + json.dumps(record) + "\n")
        tmp.replace(self.records_path)

    # ---- units -----------------------------------------------------------------------------------
    def variants(self) -> list[tuple[str, float | None]]:
        return [(FULL, None)] + [(m, r) for r in self.args.ratios for m in self.args.methods]

    @staticmethod
    def name(method: str, ratio: float | None, seed: int | None = None) -> str:
        if method == FULL:
            return FULL
        return f"{method}@{ratio:g}" + (f"-s{seed}" if base_method(method) == "random" and seed is not None else "")

    def source_dir(self) -> Path:
        return shipped.policy_dir(self.args.policy)

    def analysis(self) -> Path:
        out = self.out / "analysis"
        # an analysis written before the vision stack was captured is redone (deterministic: the other
        # stacks' matrices come out the same)
        if not (out / "analysis.json").exists() or "vision" not in json.loads((out / "analysis.json").read_text())[
                "stacks"]:
            run_analyze(AnalyzeConfig(policy=PolicyArgs(path=self.args.policy), dataset=self.dataset(), out=str(out),
                                      overwrite=True))
        return out / "analysis.json"

    def dataset(self) -> DatasetArgs:
        return DatasetArgs(repo_id=self.args.data_repo_id, root=str(self.args.data_root))

    def pruned(self, method: str, ratio: float | None, seed: int) -> Path:
        """The checkpoint a variant fine-tunes from (pruned once; ``random`` once per seed)."""
        if method == FULL:
            return self.source_dir()
        out = self.out / "pruned" / self.name(method, ratio, seed)
        if not (out / "model.safetensors").exists():
            stacks = ["vision", "vlm", "expert"] if method.endswith(VISION) else None
            base = base_method(method)
            plan = PlanArgs(ratio=ratio, seed=seed, stacks=stacks) if base == DEFAULT else \
                PlanArgs(method=base, ratio=ratio, seed=seed, refine="off", stacks=stacks)
            run_prune(PruneConfig(policy=PolicyArgs(path=self.args.policy), dataset=self.dataset(), plan=plan,
                                  analysis=str(self.analysis()), out=str(out), overwrite=True))
        return out

    def timing(self, method: str, ratio: float) -> dict[str, Any]:
        pruned = self.pruned(method, ratio, 0)
        result = run_bench(BenchConfig(policy=PolicyArgs(path=self.args.policy, device=self.args.device),
                                       pruned=PrunedArgs(path=str(pruned)), dataset=self.dataset(),
                                       train_batch_size=self.args.batch_size, rounds=self.args.timing_rounds))
        keep = ("inference_ratio", "ideal_inference_ratio", "train_step_ratio", "ideal_train_ratio", "machine", "kept")
        return {**{k: result[k] for k in keep}, "full_chunk_s": result["full"]["chunk_s"],
                "pruned_chunk_s": result["pruned"]["chunk_s"], "full_train_step_s": result["full"]["train_step_s"],
                "pruned_train_step_s": result["pruned"]["train_step_s"]}

    def evaluate(self, checkpoint: Path, seed: int) -> dict[str, Any]:
        bundle = load_policy(str(checkpoint), device=self.args.device)
        return mw.evaluate(bundle.policy, bundle.preprocessor, bundle.postprocessor, self.held_out,
                           episodes_per_task=self.args.eval_episodes, image_size=self.model.image_size,
                           max_steps=self.args.max_steps, seed=seed, batch_size=10, progress=False)

    def finetune(self, start: Path, name: str, seed: int) -> tuple[Path, dict[str, Any]]:
        a = self.args
        run = lerobot_train(start, repo_id=a.data_repo_id, root=a.data_root, out=self.out / "runs" / f"{name}-s{seed}",
                            steps=a.steps, batch_size=a.batch_size, seed=seed, device=a.device, lr=a.lr)
        return run.checkpoint, {"train_wall_s": run.wall_s, "update_s": run.update_s, "data_s": run.data_s,
                                "final_loss": run.final_loss}

    def units(self) -> list[tuple[str, str, float | None, int]]:
        """Every unit ``(kind, method, ratio, seed)`` in the order they run: the first seed's fine-tuned
        variants (the comparison), the full model's other seeds (its spread: how large a difference
        means anything), the other seeds' pruned variants, then the timings and the training-free points.
        A run cut short keeps the most informative units."""
        first, *others = self.args.seeds
        pruned = [(m, r) for m, r in self.variants() if m != FULL]
        units = [("finetuned", m, r, first) for m, r in self.variants()]
        units += [("finetuned", FULL, None, s) for s in others]
        units += [("finetuned", m, r, s) for s in others for m, r in pruned]
        units += [("timing", m, r, 0) for m, r in pruned]
        units += [("training_free", m, r, 0) for m, r in self.variants()]
        return units

    # ---- the study -----------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.check_settings()
        mw.check_tasks(self.held_out)
        self.analysis()
        for seed in a.seeds:
            for method, ratio in self.variants():
                self.pruned(method, ratio, seed)
        records = self.records()
        bar = tqdm(self.units(), desc="study units")
        for kind, method, ratio, seed in bar:
            key = f"{kind}/{self.name(method, ratio)}/s{seed}"
            bar.set_postfix_str(key)
            if key in records:
                continue
            record: dict[str, Any] = {"key": key, "kind": kind, "method": method, "ratio": ratio, "seed": seed}
            start = self.pruned(method, ratio, seed)
            if method != FULL:
                manifest = json.loads((start / "prune_manifest.json").read_text())
                planned = manifest["settings"].get("stacks", list(manifest["stacks"]))  # not the opt-in vision stack
                record["kept"] = {n: s["kept_original"] for n, s in manifest["stacks"].items() if n in planned}
                record["planned_by"] = manifest["method"]
                check_same_plan(records, record, start)
            twin = same_unit(records, record)
            if twin is not None:
                record.update({k: v for k, v in twin.items() if k not in record}, shared_with=twin["key"])
            elif kind == "timing":
                assert ratio is not None
                record["timing"] = self.timing(method, ratio)
            elif kind == "training_free":
                record["evaluation"] = self.evaluate(start, seed)
            else:
                final, stats = self.finetune(start, self.name(method, ratio, seed), seed)
                record.update(stats)
                record["evaluation"] = self.evaluate(final, seed)
            self.save_record(record)
            records[key] = record
            self.write(records)  # the table so far, after every unit
        self.write(records)

    def write(self, records: dict[str, dict[str, Any]]) -> None:
        write_results(self.out, self.args, records, self.reported(records))

    def reported(self, records: dict[str, dict[str, Any]]) -> list[tuple[str, float | None]]:
        """The variants the table shows: this run's, then any other recorded in ``--out`` (a study grows by
        reruns that add methods, ratios or seeds; none of its finished units leaves the table)."""
        shown = self.variants()
        for r in records.values():
            if (r["method"], r["ratio"]) not in shown:
                shown.append((r["method"], r["ratio"]))
        return shown


def same_unit(records: dict[str, dict[str, Any]], record: dict[str, Any]) -> dict[str, Any] | None:
    """A finished unit of another variant with this unit's kind, seed and kept blocks (its result is this
    unit's: the same checkpoint, fine-tuned and evaluated with the same seed and recipe), or None."""
    if "kept" not in record:
        return None
    return next((r for r in records.values() if r["kind"] == record["kind"] and r["seed"] == record["seed"]
                 and r.get("kept") == record["kept"] and "shared_with" not in r), None)


def check_same_plan(records: dict[str, dict[str, Any]], record: dict[str, Any], checkpoint: Path) -> None:
    """A variant's units must share one plan (``random``: one per seed). A pruned checkpoint planned
    again on another machine could differ where plans nearly tie; then its results cannot join."""
    for other in records.values():
        same = Study.name(other["method"], other["ratio"]) == Study.name(record["method"], record["ratio"])
        if same and (base_method(record["method"]) != "random" or other["seed"] == record["seed"]) and "kept" in other \
                and other["kept"] != record["kept"]:
            raise SystemExit(f"{checkpoint} keeps {record['kept']}, but the recorded unit {other['key']} of the same "
                             f"variant kept {other['kept']}: prune it with --plan.kept set to the recorded plan")


# ---- results ------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: dict[str, dict[str, Any]], variants: list[tuple[str, float | None]]) -> list[dict[str, Any]]:
    rows = []
    for method, ratio in variants:
        label = Study.name(method, ratio)
        mine = [r for r in records.values() if Study.name(r["method"], r["ratio"]) == label]
        tuned = sorted((r for r in mine if r["kind"] == "finetuned"), key=lambda r: r["seed"])
        free = [r for r in mine if r["kind"] == "training_free"]
        timing = [r["timing"] for r in mine if r["kind"] == "timing"]
        row: dict[str, Any] = {"variant": label, "method": method, "ratio": ratio, "depth": 1 - (ratio or 0.0),
                               "seeds": [r["seed"] for r in tuned],
                               "success": [r["evaluation"]["success_rate"] for r in tuned],
                               "success_per_task": [{t: v["success_rate"] for t, v in r["evaluation"]["tasks"].items()}
                                                    for r in tuned],
                               "update_s": [r["update_s"] for r in tuned],
                               "training_free_success": free[0]["evaluation"]["success_rate"] if free else None,
                               "timing": timing[0] if timing else None,
                               "kept": tuned[0].get("kept") if tuned and base_method(method) != "random" else None}
        if row["success"]:
            row["success_mean"], row["success_sd"] = _mean_sd(row["success"])
        rows.append(row)
    full = next((r for r in rows if r["method"] == FULL), None)
    for row in rows:
        if full is not None and row is not full:
            row["vs_full"] = paired_difference(dict(zip(row["seeds"], row["success"], strict=True)),
                                               dict(zip(full["seeds"], full["success"], strict=True)))
    return rows


def paired_difference(success: dict[int, float], full: dict[int, float]) -> dict[str, Any] | None:
    """A variant's success minus the full model's at the same seeds: each seed fine-tunes with the same
    seed and evaluates at the same episode positions, so the difference drops what a seed does to both.
    Mean and standard error over the seeds both have (None without any)."""
    seeds = sorted(set(success) & set(full))
    if not seeds:
        return None
    differences = [success[s] - full[s] for s in seeds]
    mean, sd = _mean_sd(differences)
    return {"seeds": seeds, "differences": differences, "mean": mean,
            "se": sd / len(seeds) ** 0.5 if len(seeds) > 1 else None}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | depth kept | success, fine-tuned (mean ± sd) | per seed | minus full, same seeds "
             "(mean ± se, points) | training-free | fine-tune s/step (lerobot-train) | train-step ratio | "
             "chunk ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timing"]
        if len(r["success"]) > 1:
            succ = f"{r['success_mean']:.1%} ± {r['success_sd']:.1%}"
        else:
            succ = f"{r['success_mean']:.1%} (1 seed)" if r["success"] else "–"
        seeds = " / ".join(f"{s:.0%}" for s in r["success"]) or "–"
        free = f"{r['training_free_success']:.0%}" if r["training_free_success"] is not None else "–"
        upd = [u for u in r["update_s"] if u is not None]
        step = f"{statistics.mean(upd):.3f}" if upd else "–"
        if r["method"] == FULL:
            ratios = "1.00 | 1.00"
        else:
            ratios = f"{t['train_step_ratio']:.2f} | {t['inference_ratio']:.2f}" if t else "– | –"
        paired = r.get("vs_full")
        if paired is None:
            versus = "–"
        else:
            spread = f" ± {100 * paired['se']:.1f}" if paired["se"] is not None else ""
            count = len(paired["seeds"])
            versus = f"{100 * paired['mean']:+.1f}{spread} ({count} seed{'s' * (count > 1)})"
        cells = [r["variant"], f"{r['depth']:.0%}", succ, seeds, versus, free, step, ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    full = next((r for r in rows if r["method"] == FULL and r["success"]), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({r["method"] for r in rows if r["method"] != FULL}, key=lambda m: (m not in METHODS, m))
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method and r["success"]), key=lambda r: -r["depth"])
        points = ([full] if full else []) + mine
        if not mine:
            continue
        color = f"C{i}"
        xs = [p["depth"] for p in points]
        ys = [p["success_mean"] for p in points]
        lo = [p["success_mean"] - min(p["success"]) for p in points]
        hi = [max(p["success"]) - p["success_mean"] for p in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=f"{method}, fine-tuned")
        free = [r for r in rows if r["method"] == method and r["training_free_success"] is not None]
        if free:
            ax.plot([r["depth"] for r in free], [r["training_free_success"] for r in free], ls="none", marker="x",
                    color=color, label=f"{method}, training-free")
    if full:
        ax.axhline(full["success_mean"], color="gray", ls=":", label="full, fine-tuned")
    ax.set_xlabel("depth kept (fraction of blocks in each stack)")
    ax.set_ylabel("success on held-out tasks")
    ax.set_ylim(-0.05, 1.05)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("MetaWorld held-out tasks: points = mean, bars = min..max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, args: argparse.Namespace, records: dict[str, dict[str, Any]],
                  variants: list[tuple[str, float | None]]) -> None:
    rows = [r for r in summarize(records, variants)  # variants with no unit recorded yet are left out
            if r["success"] or r["training_free_success"] is not None or r["timing"]]
    machine = machine_description(args.device)
    held_out = list(shipped.get(args.policy).held_out)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "held_out": held_out,
              "machine": machine, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    text = table(rows)
    (out / "table.md").write_text(text + "\n")
    plot(rows, out / "success_vs_depth.png")
    print(text)
    print(f"\n{machine}; results in {out}/results.json, table.md, success_vs_depth.png")


if __name__ == "__main__":
    main()
