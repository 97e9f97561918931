"""Task-free online learning inside the loop: one pass over the stream, evaluated at any time.

With ``online:`` in the config the loop trains a single phase whose batches come from the
online schedule (:mod:`retain.streams.online`) instead of shuffled epochs of one task. This
module is what the loop asks along the way:

- which batches, how many steps, and what the strategies are told (one task called
  ``stream``, its items relabelled ``stream`` unless ``task_labels``);
- before a batch trains, its items' scores under the model as it is (prequential accuracy:
  the online accuracy on data not yet trained on);
- after a step, whether an anytime evaluation is due (every ``eval_every`` examples) and
  whether a hidden boundary was crossed: there every task is scored as a row of R, so AA,
  BWT, FWT and FM mean what they mean for a stream with boundaries.

``state.online`` holds every record, so a killed run resumes with its curve intact.
"""

from __future__ import annotations

from typing import Any, Iterator

from retain.streams.online import hidden_boundaries, online_batches, schedule, steps_for
from retain.streams.task import Item, Task

#: The one task strategies see in online mode: no identity, no boundary.
STREAM = "stream"


class OnlineRun:
    def __init__(self, config, stream, state) -> None:
        self.config, self.options, self.stream, self.state = config, config.online, stream, state
        self.sizes = [len(t.train) for t in stream.tasks]
        self.total = sum(self.sizes)
        self.order = schedule(self.sizes, self.options.boundaries, self.options.blur, config.seed)
        self.boundaries = hidden_boundaries(self.sizes)
        every = self.options.eval_every or max(1, self.total // (4 * len(self.sizes)))
        points = set(range(every, self.total, every)) | set(self.boundaries[:-1])
        self.points = sorted(points)
        probe_every = self.options.probe_every
        self.probe_points = set(self.boundaries[:-1]) | (set(range(probe_every, self.total, probe_every))
                                                         if probe_every else set())
        self.batch_size = config.train.batch_size
        self.steps = steps_for(self.total, self.batch_size, self.options.passes)
        if state.online is None:
            state.online = {"examples": self.total, "boundaries": self.boundaries, "eval_every": every,
                            "schedule": self.options.boundaries, "blur": self.options.blur,
                            "passes": self.options.passes, "curve": [], "prequential": []}

    # -- what the loop trains on ----------------------------------------------------------
    def hook_tasks(self) -> list[Task]:
        return [Task(STREAM, [], [])] if not self.options.task_labels else list(self.stream.tasks)

    def batches(self, tokenizer) -> Iterator[list[Item]]:
        items = [t.items(tokenizer) for t in self.stream.tasks]
        label = None if self.options.task_labels else STREAM
        return online_batches(self.order, items, self.batch_size, self.options.passes, label)

    def seen(self, step: int) -> int:
        """Examples that have arrived after ``step`` optimizer steps (a batch arrives at its first pass)."""
        batches = -(-step // self.options.passes)
        return min(batches * self.batch_size, self.total)

    def tasks_seen(self, examples: int) -> list[bool]:
        arrived = {t for t, _ in self.order[:examples]}
        return [t in arrived for t in range(len(self.sizes))]

    # -- along the way ----------------------------------------------------------------------
    def before_step(self, ctx, step: int, score) -> None:
        """Prequential scores of the batch about to train for the first time (``score(task, examples)``)."""
        if not self.options.prequential or step % self.options.passes:
            return
        start = (step // self.options.passes) * self.batch_size
        pairs = self.order[start:start + self.batch_size]
        by_task: dict[int, list] = {}
        for t, i in pairs:
            by_task.setdefault(t, []).append(self.stream.tasks[t].train[i])
        values = {}
        for t, examples in by_task.items():
            values[self.stream.tasks[t].name] = [round(v, 3) for v in score(self.stream.tasks[t], examples)]
        self.state.online["prequential"].append({"examples": start + len(pairs), "scores": values})

    def due(self, step: int) -> list[int]:
        """Evaluation points (in examples) reached by ``step`` and not yet evaluated."""
        if step % self.options.passes:
            return []
        done = self.state.online["curve"][-1]["examples"] if self.state.online["curve"] else 0
        seen = self.seen(step)
        return [p for p in self.points if done < p <= seen]

    def record(self, examples: int, scores: list[float], probe: float | None) -> None:
        seen = self.tasks_seen(examples)
        mean_seen = sum(s for s, k in zip(scores, seen) if k) / max(sum(seen), 1)
        self.state.online["curve"].append({"examples": examples, "scores": [round(s, 4) for s in scores],
                                           "seen_mean": round(mean_seen, 4), "probe": probe})

    def is_boundary(self, examples: int) -> int | None:
        """The index of the task whose hidden boundary ``examples`` is (not the stream's end)."""
        return self.boundaries.index(examples) if examples in self.boundaries[:-1] else None

    def wants_probe(self, examples: int) -> bool:
        return examples in self.probe_points


def shifts(online: dict[str, Any], stats: list[dict[str, Any]], batch_size: int) -> list[int] | None:
    """Where a strategy detected shifts (``shifts_at_step`` in its stats), in examples seen."""
    found = [s for by_strategy in stats[-1:] for st in by_strategy.values() if isinstance(st, dict)
             for s in st.get("shifts_at_step", [])]
    if not any("shifts_at_step" in st for by_strategy in stats[-1:] for st in by_strategy.values()
               if isinstance(st, dict)):
        return None
    return [min(-(-step // online["passes"]) * batch_size, online["examples"]) for step in found]


def summary(online: dict[str, Any]) -> dict[str, Any]:
    """AAA (the mean over evaluations of the mean score over the tasks seen so far) and the
    online (prequential) accuracy over every incoming example, in all and per task."""
    curve = online.get("curve") or []
    out: dict[str, Any] = {"AAA": round(sum(c["seen_mean"] for c in curve) / len(curve), 4) if curve else None}
    per_task: dict[str, list[float]] = {}
    for record in online.get("prequential") or []:
        for task, values in record["scores"].items():
            per_task.setdefault(task, []).extend(values)
    every = [v for values in per_task.values() for v in values]
    out["online_accuracy"] = round(sum(every) / len(every), 4) if every else None
    out["online_accuracy_per_task"] = {t: round(sum(v) / len(v), 4) for t, v in per_task.items()}
    return out
