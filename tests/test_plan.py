"""Exhaustive and property tests for vlaprune.core.plan: every optimiser against brute force on small stacks."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter

import numpy as np
import pytest

from vlaprune.core.plan import (
    METHODS,
    POOL,
    Budget,
    Plan,
    PlanError,
    PlanProblem,
    StackProblem,
    candidate_plans,
    feasible_keep_counts,
    greedy_evaluations,
    greedy_removal,
    path_cost,
    plan_removal,
    validate_kept,
)


# ------------------------------------------------------------------------------------------ helpers
def _sym(num_layers: int, seed: int, low: float = 0.0) -> np.ndarray:
    """A random symmetric (L+1, L+1) similarity matrix with unit diagonal."""
    a = np.random.default_rng(seed).uniform(low, 1.0, (num_layers + 1, num_layers + 1))
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def _roles(kind: str | None, n: int) -> tuple[str, ...] | None:
    if kind == "period2":
        return tuple("self" if i % 2 == 0 else "cross" for i in range(n))
    if kind == "mod3":
        return tuple("self" if i % 3 == 0 else "cross" for i in range(n))
    return None


def _feasible(kept: tuple[int, ...], rules: list[tuple[tuple[str, ...] | None, frozenset[int]]]) -> bool:
    """Independent statement of the rules: protected kept, each kept block keeps its role."""
    for roles, protected in rules:
        if not protected <= set(kept):
            return False
        if roles is not None and any(roles[new] != roles[orig] for new, orig in enumerate(kept)):
            return False
    return True


def _brute(problem: PlanProblem, k: int) -> list[tuple[int, ...]]:
    """All feasible kept sets of size k for the (single) planning unit of ``problem``."""
    n = problem.stacks[0].num_layers
    rules = [(s.roles, s.protected) for s in problem.stacks]
    return [c for c in itertools.combinations(range(n), k) if _feasible(c, rules)]


def _group_cost(problem: PlanProblem, kept: tuple[int, ...]) -> float:
    return sum(path_cost(s.cka, kept) for s in problem.stacks)


def _case(n: int, roles: str | None, prot: str, lockstep: bool, seed: int) -> PlanProblem:
    protected = {"none": frozenset(), "first": frozenset({0}), "mixed": frozenset({2, n - 1})}[prot]
    a = StackProblem("vlm", n, _sym(n, seed), _sym(n, seed + 100, 0.3), _roles(roles, n), protected)
    if not lockstep:
        return PlanProblem((a,))
    b_roles = _roles("period2" if roles == "mod3" else None, n)
    b = StackProblem("expert", n, _sym(n, seed + 1), _sym(n, seed + 101, 0.3), b_roles, frozenset({n - 2}))
    return PlanProblem((a, b), lockstep=(("vlm", "expert"),))


CASES = [
    pytest.param(n, roles, prot, lock, id=f"L{n}-{roles}-{prot}-{'lock' if lock else 'single'}")
    for n in (6, 7, 8)
    for roles in (None, "period2", "mod3")
    for prot in ("none", "first", "mixed")
    for lock in (False, True)
]


def _kept(plan: Plan) -> tuple[int, ...]:
    values = set(plan.kept.values())
    assert len(values) == 1  # one planning unit in these problems
    return values.pop()


# ---------------------------------------------------------------------------------------- path cost
def test_path_cost_by_hand() -> None:
    cka = np.array([[1.0, 0.9, 0.7, 0.5],
                    [0.9, 1.0, 0.8, 0.6],
                    [0.7, 0.8, 1.0, 0.4],
                    [0.5, 0.6, 0.4, 1.0]])  # L = 3 blocks, 4 states
    assert path_cost(cka, [0, 1, 2]) == 0.0
    assert path_cost(cka, [0, 2]) == pytest.approx(1 - cka[1, 2])  # block 2 gets state 1 instead of 2
    assert path_cost(cka, [1]) == pytest.approx((1 - cka[0, 1]) + (1 - cka[2, 3]))
    assert path_cost(cka, [0]) == pytest.approx(1 - cka[1, 3])
    assert path_cost(cka, [2]) == pytest.approx(1 - cka[0, 2])
    off = cka.copy()
    np.fill_diagonal(off, 0.7)  # a diagonal that is not exactly 1 is never read
    assert path_cost(off, [0, 1, 2]) == 0.0
    for bad in ([], [1, 0], [0, 0], [3]):
        with pytest.raises(PlanError):
            path_cost(cka, bad)


# --------------------------------------------------------------------------- cka-dp and feasibility
@pytest.mark.parametrize(("n", "roles", "prot", "lock"), CASES)
def test_cka_dp_equals_brute_force(n: int, roles: str | None, prot: str, lock: bool) -> None:
    problem = _case(n, roles, prot, lock, seed=n * 7 + len(prot))
    name = problem.stacks[0].name
    feasible = [k for k in range(1, n + 1) if _brute(problem, k)]
    assert feasible_keep_counts(problem, name) == feasible
    for k in range(1, n + 1):
        budget = Budget(keep={name: k})
        if k not in feasible:
            with pytest.raises(PlanError, match=re.escape("feasible keep counts: " + ", ".join(map(str, feasible)))):
                plan_removal(problem, budget)
            continue
        best = min(_group_cost(problem, c) for c in _brute(problem, k))
        plan = plan_removal(problem, budget)
        assert len(_kept(plan)) == k
        assert _kept(plan) in _brute(problem, k)
        assert plan.cost == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize(("n", "roles", "prot", "lock"), [c for i, c in enumerate(CASES) if i % 3 == 0])
def test_threshold_budget_picks_shallowest_plan_under_threshold(n: int, roles: str | None, prot: str,
                                                                lock: bool) -> None:
    problem = _case(n, roles, prot, lock, seed=3 * n)
    optimum = {k: min(_group_cost(problem, c) for c in cs) for k in range(1, n + 1) if (cs := _brute(problem, k))}
    values = sorted(set(optimum.values()))
    thresholds = [0.0, *((a + b) / 2 for a, b in itertools.pairwise(values)), values[-1] + 1.0]
    for threshold in thresholds:
        expected = min(k for k, v in optimum.items() if v <= threshold)
        plan = plan_removal(problem, Budget(threshold=threshold))
        assert len(_kept(plan)) == expected
        assert plan.cost <= threshold + 1e-12
        assert plan.cost == pytest.approx(optimum[expected], abs=1e-12)


def test_feasible_keep_counts_roles_with_protected_last_block() -> None:
    n = 8
    problem = PlanProblem((StackProblem("expert", n, _sym(n, 1), roles=_roles("period2", n),
                                        protected=frozenset({n - 1})),))
    assert feasible_keep_counts(problem, "expert") == [2, 4, 6, 8]  # block 7 ('cross') must land at an odd slot
    with pytest.raises(PlanError, match=r"keeping 5 of 8 expert blocks cannot preserve the cross/self roles "
                                        r"of expert and protected blocks \[7\]; feasible keep counts: 2, 4, 6, 8"):
        plan_removal(problem, Budget(keep={"expert": 5}))
    with pytest.raises(ValueError, match="unknown stack"):
        feasible_keep_counts(problem, "vlm")


# ------------------------------------------------------------------------------ constrained selection
@pytest.mark.parametrize(("n", "roles", "prot", "lock"), [c for i, c in enumerate(CASES) if i % 2 == 0])
def test_bi_equals_brute_force_over_removed_scores(n: int, roles: str | None, prot: str, lock: bool) -> None:
    problem = _case(n, roles, prot, lock, seed=11 * n)
    # ShortGPT block influence, summed over the lockstep group
    bi = np.zeros(n)
    for s in problem.stacks:
        assert s.cosine is not None
        bi += 1.0 - np.diagonal(s.cosine, offset=1)
    for k in range(1, n + 1):
        sets = _brute(problem, k)
        if not sets:
            continue
        removed_score = {c: sum(bi[i] for i in range(n) if i not in c) for c in sets}
        kept = _kept(plan_removal(problem, Budget(keep={problem.stacks[0].name: k}), "bi"))
        assert kept in sets
        assert removed_score[kept] == pytest.approx(min(removed_score.values()), abs=1e-12)


def test_random_is_seeded_feasible_and_uniform() -> None:
    n, k, per_set = 8, 4, 60
    problem = _case(n, "period2", "first", False, seed=5)
    sets = _brute(problem, k)
    assert len(sets) == 10
    budget = Budget(keep={"vlm": k})
    draws = Counter(_kept(plan_removal(problem, budget, "random", seed=s)) for s in range(per_set * len(sets)))
    assert set(draws) == set(sets)  # never infeasible, every feasible set reachable
    # uniform over feasible sets: expected 60 each, sd ~7.5 (random scores + selection would be far off)
    assert 0.5 * per_set < min(draws.values()) and max(draws.values()) < 1.6 * per_set
    assert plan_removal(problem, budget, "random", seed=3) == plan_removal(problem, budget, "random", seed=3)
    assert len({_kept(plan_removal(problem, budget, "random", seed=s)) for s in range(5)}) > 1


# ---------------------------------------------------------------------------------- angular, first-k
@pytest.mark.parametrize(("n", "roles", "prot", "lock"), [c for i, c in enumerate(CASES) if i % 2 == 1])
def test_angular_picks_best_feasible_window(n: int, roles: str | None, prot: str, lock: bool) -> None:
    problem = _case(n, roles, prot, lock, seed=13 * n)
    name = problem.stacks[0].name

    def windows(width: int) -> dict[int, float]:  # feasible windows [l, l+width) and their angular distance
        out = {}
        for start in range(n - width + 1):
            kept = tuple(i for i in range(n) if not start <= i < start + width)
            if _feasible(kept, [(s.roles, s.protected) for s in problem.stacks]):
                out[start] = sum(math.acos(s.cosine[start, start + width]) / math.pi
                                 for s in problem.stacks)
        return out

    working = [w for w in range(1, n) if windows(w)]
    for width in range(1, n):
        budget = Budget(keep={name: n - width})
        if n - width not in feasible_keep_counts(problem, name):
            continue
        found = windows(width)
        if not found:
            with pytest.raises(PlanError, match=re.escape(f"window lengths that work: {working}")):
                plan_removal(problem, budget, "angular")
            continue
        plan = plan_removal(problem, budget, "angular")
        start = plan.details["window"][problem.stacks[0].name if not lock else "vlm/expert"][0]
        assert found[start] == pytest.approx(min(found.values()), abs=1e-12)
        assert _kept(plan) == tuple(i for i in range(n) if not start <= i < start + width)


def test_angular_infeasible_window_names_rule() -> None:
    n = 6
    roles = _roles("period2", n)
    problem = PlanProblem((StackProblem("expert", n, _sym(n, 2), _sym(n, 3, 0.3), roles, frozenset({3})),))
    # keeping 3 is feasible ((0, 3, 4)), but a window of 3 either holds protected block 3 or is [0, 3),
    # which shifts blocks 3, 4, 5 by an odd number of positions
    with pytest.raises(PlanError, match=r"protected blocks and roles rules; window lengths that work: \[1, 2\]"):
        plan_removal(problem, Budget(keep={"expert": 3}), "angular")
    problem = PlanProblem((StackProblem("expert", n, _sym(n, 2), _sym(n, 3, 0.3), roles),))
    assert plan_removal(problem, Budget(keep={"expert": 5}), "angular").removed("expert", n) == (5,)


def test_first_k_keeps_prefix_and_respects_protected() -> None:
    n = 8
    problem = _case(n, None, "first", True, seed=1)  # vlm protects block 0, expert block 6
    plan = plan_removal(problem, Budget(ratio=0.125), "first-k")  # K = 8 - round(1.0) = 7
    assert dict(plan.kept) == {"vlm": tuple(range(7)), "expert": tuple(range(7))}
    with pytest.raises(PlanError, match=r"first-k.*protected blocks \[6\]"):
        plan_removal(problem, Budget(ratio=0.5), "first-k")


# ------------------------------------------------------------------------------------------ cka-run
def _planted(n: int = 8) -> np.ndarray:
    """Low similarity everywhere except the outputs of blocks 2, 3, 4 (states 3, 4, 5)."""
    cka = np.full((n + 1, n + 1), 0.5)
    cka[3, 4] = cka[4, 3] = 0.97
    cka[3, 5] = cka[5, 3] = 0.99  # block 4 is the most similar to the head (block 2)
    cka[4, 5] = cka[5, 4] = 0.98
    np.fill_diagonal(cka, 1.0)
    return cka


def test_cka_run_removes_planted_run_but_head() -> None:
    problem = PlanProblem((StackProblem("vlm", 8, _planted()),))
    by_rule = plan_removal(problem, None, "cka-run", run_threshold=0.9)
    assert by_rule.removed("vlm", 8) == (3, 4)
    assert plan_removal(problem, Budget(keep={"vlm": 6}), "cka-run").removed("vlm", 8) == (3, 4)
    one = plan_removal(problem, Budget(keep={"vlm": 7}), "cka-run")
    assert one.removed("vlm", 8) == (4,)
    # at θ = 0.99 block 2's run stops at block 3 (0.97); at 0.98 block 3 heads a run that takes block 4
    assert one.details["run_threshold"]["vlm"] == pytest.approx(0.98)
    # more removals than candidates: the threshold drops until the runs are long enough
    assert len(plan_removal(problem, Budget(keep={"vlm": 4}), "cka-run").kept["vlm"]) == 4


def test_cka_run_repairs_for_roles_and_protected(caplog: pytest.LogCaptureFixture) -> None:
    n = 8
    cka = np.full((n + 1, n + 1), 0.5)
    np.fill_diagonal(cka, 1.0)
    for block, sim in ((3, 0.98), (4, 0.96), (5, 0.99)):  # run headed by block 2 covers blocks 3, 4, 5
        cka[3, block + 1] = cka[block + 1, 3] = sim
    problem = PlanProblem((StackProblem("expert", n, cka, roles=_roles("period2", n), protected=frozenset({7})),))
    assert feasible_keep_counts(problem, "expert") == [2, 4, 6, 8]
    with caplog.at_level("INFO", logger="vlaprune.core.plan"):
        plan = plan_removal(problem, None, "cka-run", run_threshold=0.95)
    # 3 candidates would leave 5 blocks (odd: infeasible); the nearest feasible counts are 4 and 6, the
    # repair prefers removing less. Unconstrained, {3, 5} would go (most similar to the head), but that
    # moves block 4 ('self') to position 3 ('cross'): {4, 5} is the best feasible pair.
    assert plan.removed("expert", n) == (4, 5)
    assert "forces keeping 6 blocks, not 5" in caplog.text
    cka[3, 5] = cka[5, 3] = cka[3, 6] = cka[6, 3] = 0.5  # now block 3 is the only candidate
    problem = PlanProblem((StackProblem("expert", n, cka, roles=_roles("period2", n), protected=frozenset({7})),))
    assert plan_removal(problem, None, "cka-run", run_threshold=0.95).removed("expert", n) == ()


# ----------------------------------------------------------------------------- all methods, rules
@pytest.mark.parametrize(("n", "roles", "prot", "lock"), [c for i, c in enumerate(CASES) if i % 5 == 0])
def test_every_method_gives_valid_plans(n: int, roles: str | None, prot: str, lock: bool) -> None:
    problem = _case(n, roles, prot, lock, seed=17 * n)
    name = problem.stacks[0].name
    for k in feasible_keep_counts(problem, name):
        for method in METHODS:
            try:
                plan = plan_removal(problem, Budget(keep={name: k}), method)
            except PlanError as err:
                assert method in ("angular", "first-k"), err  # the only methods with their own limits
                continue
            validate_kept(problem, plan.kept)
            assert all(len(v) == k for v in plan.kept.values())
            assert plan.cost == pytest.approx(sum(path_cost(s.cka, plan.kept[s.name]) for s in problem.stacks))
            json.dumps(plan.to_json())


def test_validate_kept_names_each_rule() -> None:
    problem = _case(6, "period2", "first", True, seed=0)  # vlm protects 0, expert protects 4

    def bad(kept: dict, pattern: str) -> None:
        with pytest.raises(PlanError, match=pattern):
            validate_kept(problem, kept)

    ok = (0, 1, 2, 3, 4, 5)
    validate_kept(problem, {"vlm": ok, "expert": ok})
    bad({"vlm": ok, "expert": (0, 1, 2, 3, 4, 6)}, "expert.*out of range")
    bad({"vlm": (0, 1, 1), "expert": ok}, "vlm.*duplicate")
    bad({"vlm": (0, 2, 1, 3), "expert": ok}, "vlm.*sorted")
    bad({"vlm": (), "expert": ok}, "vlm.*empty")
    bad({"vlm": (1, 2, 3, 4), "expert": (1, 2, 3, 4)}, r"vlm.*protected blocks \[0\]")
    bad({"vlm": (0, 1, 2, 3), "expert": (0, 1, 2, 3)}, r"expert.*protected blocks \[4\]")
    bad({"vlm": (0, 1, 4, 5), "expert": (0, 1, 2, 3, 4, 5)}, "lockstep.*same indices")
    bad({"vlm": (0, 2, 4), "expert": (0, 2, 4)},
        r"role rule.*original block 2 \('self'\) would land at new position 1, whose role is 'cross'")
    bad({"vlm": ok}, r"missing \['expert'\]")


def test_budget_and_problem_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(ratio=0.5, keep={"vlm": 3})
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="0 <= ratio < 1"):
            Budget(ratio=ratio)
    with pytest.raises(ValueError, match="ints >= 1"):
        Budget(keep={"vlm": 0})
    with pytest.raises(ValueError, match="threshold"):
        Budget(threshold=-1.0)
    problem = _case(6, None, "none", True, seed=0)
    with pytest.raises(ValueError, match="share one keep count"):
        plan_removal(problem, Budget(keep={"vlm": 3, "expert": 4}))
    with pytest.raises(ValueError, match="unknown stacks"):
        plan_removal(problem, Budget(keep={"vla": 3}))
    with pytest.raises(PlanError, match="removes all"):
        plan_removal(problem, Budget(ratio=0.95))
    with pytest.raises(ValueError, match="unknown method"):
        plan_removal(problem, Budget(ratio=0.5), "shortgpt")
    with pytest.raises(ValueError, match="run_threshold"):
        plan_removal(problem, Budget(ratio=0.5), "cka-run", run_threshold=0.9)
    with pytest.raises(ValueError, match="shape"):
        StackProblem("vlm", 6, np.eye(6))
    nan = _sym(4, 0)
    nan[2, 3] = nan[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"not finite at states \[2, 3\]"):
        StackProblem("vlm", 4, nan)
    a, b = StackProblem("vlm", 4, _sym(4, 0)), StackProblem("expert", 5, _sym(5, 0))
    with pytest.raises(ValueError, match="equal num_layers"):
        PlanProblem((a, b), lockstep=(("vlm", "expert"),))
    with pytest.raises(ValueError, match="unknown stacks"):
        PlanProblem((a,), lockstep=(("vlm", "expert"),))
    with pytest.raises(ValueError, match="unique"):
        PlanProblem((a, a))
    with pytest.raises(PlanError, match="cosine"):
        plan_removal(PlanProblem((a,)), Budget(ratio=0.5), "bi")


def test_independent_stacks_are_planned_separately() -> None:
    a, b = StackProblem("vlm", 6, _sym(6, 1)), StackProblem("expert", 4, _sym(4, 2))
    plan = plan_removal(PlanProblem((a, b)), Budget(keep={"vlm": 3}))
    assert len(plan.kept["vlm"]) == 3 and plan.kept["expert"] == (0, 1, 2, 3)
    assert plan.cost == pytest.approx(path_cost(a.cka, plan.kept["vlm"]))
    assert plan.removed("expert", 4) == ()


# ------------------------------------------------------------------------------------ candidates
def test_the_refine_pool_holds_the_baselines_and_the_similarity_plans_once_each() -> None:
    problem = _case(8, None, "first", False, seed=9)
    budget = Budget(ratio=0.5)
    plans = candidate_plans(problem, budget)
    reference: dict[tuple, list[Plan]] = {}
    for method in POOL:  # every pool method on its own, grouped by kept set, in the pool's order
        plan = plan_removal(problem, budget, method)
        reference.setdefault(_kept(plan), []).append(plan)
    assert [_kept(p) for p in plans] == list(reference) and plans[0].method == "first-k"
    assert [p.details.get("also", []) for p in plans] == [[q.method for q in same[1:]] for same in reference.values()]
    assert "random" not in {p.method for p in plans}
    no_cosine = PlanProblem((StackProblem("vlm", 8, _sym(8, 4)),))
    methods = [p.method for p in candidate_plans(no_cosine, Budget(ratio=0.5))]
    assert "bi" not in methods and "angular" not in methods and "cka-dp" in methods
    protected = PlanProblem((StackProblem("vlm", 8, _sym(8, 4), protected=frozenset({7})),))
    assert "first-k" not in {p.method for p in candidate_plans(protected, Budget(ratio=0.5))}


# ------------------------------------------------------------------------------ greedy (loss planner)
def _counting(score):
    calls = []

    def wrapped(kept):
        calls.append({k: tuple(v) for k, v in kept.items()})
        return score(kept)

    return wrapped, calls


@pytest.mark.parametrize(("n", "roles", "prot", "lock"), [c for i, c in enumerate(CASES) if i % 2 == 0])
def test_greedy_takes_the_best_feasible_removal_at_every_step(n: int, roles: str | None, prot: str,
                                                             lock: bool) -> None:
    """Against an independent replay: from each state of the recorded order, every single removal that
    leaves a feasible kept set of the target size (brute force) is scored, and the chosen one is the
    lowest; the score is the cka-dp cost of the current set, which re-scoring makes non-additive."""
    problem = _case(n, roles, prot, lock, seed=11 * n + len(prot))
    name = problem.stacks[0].name
    names = [s.name for s in problem.stacks]
    for k in feasible_keep_counts(problem, name):
        budget = Budget(keep={name: k})
        score, calls = _counting(lambda kept: sum(path_cost(s.cka, kept[s.name]) for s in problem.stacks))
        plan = greedy_removal(problem, budget, score)
        assert _kept(plan) in _brute(problem, k) and len(calls) == plan.details["evaluations"]
        assert plan.details["evaluations"] <= greedy_evaluations(problem, budget)
        targets = set(_brute(problem, k))
        current = tuple(range(n))
        for step in plan.details["order"]:
            options = {b: sum(path_cost(s.cka, tuple(i for i in current if i != b)) for s in problem.stacks)
                       for b in current
                       if any(set(t) <= set(current) - {b} for t in targets)}
            assert step["removed"] in options and step["score"] == pytest.approx(min(options.values()), abs=1e-12)
            assert step["removed"] == min(b for b, v in options.items() if v == step["score"])  # ties: lowest
            current = tuple(i for i in current if i != step["removed"])
        assert current == _kept(plan) and set(plan.kept) == set(names)


def test_greedy_with_an_additive_score_is_the_optimum_and_counts_its_evaluations() -> None:
    """Scores that add up over removed blocks make greedy exact (no rules); the evaluations equal the bound."""
    weights = np.random.default_rng(5).uniform(0, 1, 9)
    problem = PlanProblem((StackProblem("vlm", 9, _sym(9, 5)),))
    for k in range(1, 10):
        score, calls = _counting(lambda kept: float(sum(weights[i] for i in range(9) if i not in kept["vlm"])))
        plan = greedy_removal(problem, Budget(keep={"vlm": k}), score)
        assert set(plan.kept["vlm"]) == set(np.argsort(weights)[9 - k:].tolist())
        assert len(calls) == greedy_evaluations(problem, Budget(keep={"vlm": k})) == sum(range(k + 1, 10))
    assert plan.cost == 0.0 and plan.details == {"evaluations": 0, "order": []}  # k = 9: nothing to try


def test_greedy_plans_every_unit_together_under_lockstep_and_protection() -> None:
    a = StackProblem("vlm", 6, _sym(6, 1), protected=frozenset({5}))
    b = StackProblem("expert", 6, _sym(6, 2))
    c = StackProblem("dit", 4, _sym(4, 3), roles=_roles("period2", 4))
    problem = PlanProblem((a, b, c), lockstep=(("vlm", "expert"),))
    budget = Budget(keep={"vlm": 3, "dit": 2})
    score, calls = _counting(lambda kept: -float(sum(kept["vlm"])) + 0.1 * sum(kept["dit"]))
    plan = greedy_removal(problem, budget, score)
    assert plan.kept["vlm"] == plan.kept["expert"] == (3, 4, 5) and plan.kept["dit"] == (0, 1)
    assert all(call["vlm"] == call["expert"] and 5 in call["vlm"] for call in calls)
    assert len(calls) <= greedy_evaluations(problem, budget) == sum(10 - t for t in range(5))  # units of 6 and 4
    validate_kept(problem, plan.kept)


def test_greedy_rejects_a_bad_score_and_an_infeasible_budget() -> None:
    problem = PlanProblem((StackProblem("dit", 6, _sym(6, 1), roles=_roles("period2", 6), protected=frozenset({5})),))
    with pytest.raises(ValueError, match="score of removing dit block 0 is nan"):
        greedy_removal(problem, Budget(keep={"dit": 4}), lambda kept: math.nan)
    feasible = feasible_keep_counts(problem, "dit")
    bad = next(k for k in range(1, 7) if k not in feasible)
    with pytest.raises(PlanError, match=re.escape("feasible keep counts: " + ", ".join(map(str, feasible)))):
        greedy_removal(problem, Budget(keep={"dit": bad}), lambda kept: 0.0)
