"""What was forgotten, item by item: forgetting events (Toneva et al. 2019) at the level of a
continual-learning stream.

An item of task j is *forgotten* when it was right in the evaluation right after the phase
that trained task j and is wrong at the end; *retained* when right at both; *learned later*
when wrong then and right at the end (a later task, or replay, taught it); *never* when wrong
at both. For a probe the two times are the base model and the end. Only accuracy-scored items
have right and wrong; other metrics (ROUGE, perplexity) are left out.
"""

from __future__ import annotations

from typing import Any

from retain.evaluation.uncertainty import decode, is_accuracy

#: Examples listed per task in results.json and the report (the counts cover all items).
LISTED = 20
INPUT_CHARS = 300


def transitions(before: str, after: str) -> dict[str, list[int]]:
    """Item indices by what happened between two evaluations of the same items."""
    a, b = decode(before) > 0, decode(after) > 0
    groups: dict[str, list[int]] = {"forgotten": [], "retained": [], "learned_later": [], "never": []}
    for k, (x, y) in enumerate(zip(a, b)):
        key = ("retained" if y else "forgotten") if x else ("learned_later" if y else "never")
        groups[key].append(k)
    return groups


def _rows(task, items_then: dict, items_end: dict, indices: list[int]) -> list[dict[str, Any]]:
    rows = []
    for k in indices[:LISTED]:
        ex = task.test[k]
        then, end = items_then["answers"][k], items_end["answers"][k]
        if ex.options is not None and isinstance(then, int):
            then, end = ex.options[then], ex.options[end]
        rows.append({"item": k, "input": ex.input[:INPUT_CHARS], "gold": ex.output, "then": then, "end": end})
    return rows


def forgotten_examples(stream, state: dict[str, Any]) -> dict[str, Any]:
    """Per task and probe: counts of forgotten / retained / learned-later / never items and the
    first forgotten ones with the answers at both times."""
    evaluations = state.get("evaluations") or []
    phases = state.get("phases") or []
    if len(evaluations) < 2:
        return {}
    out: dict[str, Any] = {}
    trained_at = {}
    for p, names in enumerate(phases):
        for name in names:
            trained_at.setdefault(name, p + 1)  # its first training phase: evaluation p + 1
    pairs = [(t, trained_at.get(t.name)) for t in stream.tasks] + [(p, 0) for p in stream.probes]
    for task, row in pairs:
        if row is None:
            continue
        then, end = (evaluations[row].get("items") or {}).get(task.name), (evaluations[-1].get("items") or {}).get(task.name)
        if then is None or end is None or not is_accuracy(then["scores"]):
            continue
        groups = transitions(then["scores"], end["scores"])
        out[task.name] = {"then": "base model" if row == 0 else "after " + "+".join(phases[row - 1]),
                          "counts": {k: len(v) for k, v in groups.items()},
                          "forgotten": _rows(task, then, end, groups["forgotten"])}
    return out
