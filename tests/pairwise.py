"""All-pairs combination of test parameters: every value of every parameter meets every
value of every other parameter in at least one case, with far fewer cases than the full
cross product. Deterministic (seeded), with an optional predicate for infeasible cases."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def pairwise_cases(
    parameters: Mapping[str, Sequence[Any]],
    allowed: Callable[[dict], bool] = lambda case: True,
    seed: int = 0,
    candidates_per_case: int = 40,
) -> list[dict]:
    names = list(parameters)
    rng = random.Random(seed)

    def pairs_of(case: dict) -> set:
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in parameters[a]
        for vb in parameters[b]
    }
    cases: list[dict] = []
    while uncovered:
        target = min(uncovered, key=repr)  # deterministic choice of the pair to cover next
        best, best_gain = None, 0
        for _ in range(candidates_per_case * 10):
            case = {name: rng.choice(list(parameters[name])) for name in names}
            case[target[0]], case[target[2]] = target[1], target[3]
            if not allowed(case):
                continue
            gain = len(pairs_of(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
            if best is not None and _ >= candidates_per_case:
                break
        if best is None:
            uncovered.discard(target)  # no feasible case holds this pair
            continue
        cases.append(best)
        uncovered -= pairs_of(best)
    return cases


def case_id(case: dict) -> str:
    return "-".join(
        f"{k}={getattr(v, '__name__', None) or str(v).replace('torch.', '')}"
        for k, v in case.items()
    )
