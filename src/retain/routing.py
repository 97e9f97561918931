"""Task routing at inference: which task's parameters should answer an input?

Per-task methods (one adapter per task) are exact when the caller names the task. In the
task-agnostic setting nobody does: the router embeds the input with the frozen base
model and picks the task whose centroid of training inputs is nearest (cosine). The
evaluation then scores each test example with the predicted task's parameters and
reports the routing accuracy next to the scores.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from retain.embeddings import embed_texts

#: Training inputs per task averaged into its centroid (a sample: the mean settles fast).
CENTROID_SAMPLES = 128


class TaskRouter:
    """Nearest-centroid routing over the base model's mean-pooled hidden states."""

    def __init__(self, base: Callable[[], AbstractContextManager]) -> None:
        #: A context in which the model is the frozen base (adapters off), so that
        #: centroids computed at task 1 still match inputs embedded at task 5.
        self.base = base
        self.centroids: dict[str, torch.Tensor] = {}

    def embed(self, ctx, prompts: Sequence[str]) -> torch.Tensor:
        with self.base():
            return embed_texts(ctx.model, ctx.tokenizer, list(prompts), ctx.config.eval.batch_size,
                               ctx.config.train.max_length)

    def add_task(self, ctx, task: str, prompts: Sequence[str]) -> None:
        if not prompts:
            raise ValueError(f"task '{task}' has no training inputs to route by")
        self.centroids[task] = F.normalize(self.embed(ctx, prompts[:CENTROID_SAMPLES]).mean(0), dim=0)

    def predict(self, ctx, prompts: Sequence[str]) -> list[str]:
        if not self.centroids:
            raise ValueError("no task has been trained yet: nothing to route to")
        names = list(self.centroids)
        sims = self.embed(ctx, prompts) @ torch.stack([self.centroids[n] for n in names]).T
        return [names[i] for i in sims.argmax(1).tolist()]

    def state(self) -> dict[str, Any]:
        return {"centroids": {k: v.tolist() for k, v in self.centroids.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.centroids = {k: torch.tensor(v) for k, v in state.get("centroids", {}).items()}


def agnostic_evaluation(ctx, stack, router: TaskRouter, advance: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Scores with predicted task identity: each test example goes to the task its input is
    routed to and is scored with that task's parameters.

    A task's score combines its groups weighted by size, which is exact for accuracies
    (choice, exact_match) and a size-weighted mean for perplexity.
    """
    from retain.evaluation.scoring import score_task

    cfg = ctx.config.eval
    trained = set(router.centroids)
    per_task, scores, confusion = {}, {}, {}
    for task in ctx.stream.tasks:
        examples = list(task.test)
        if task.name not in trained or not examples:
            continue
        predicted = router.predict(ctx, [ex.input for ex in examples])
        confusion[task.name] = {p: predicted.count(p) for p in sorted(set(predicted))}
        per_task[task.name] = round(100.0 * predicted.count(task.name) / len(examples), 2)
        total = 0.0
        for target in sorted(set(predicted)):
            group = [ex for ex, p in zip(examples, predicted) if p == target]
            with stack.route(ctx, target):
                value = score_task(ctx.model, ctx.tokenizer, task, group, batch_size=cfg.batch_size,
                                   max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length)
            total += value * len(group)
        scores[task.name] = round(total / len(examples), 4)
        if advance:
            advance(len(examples))
    n = sum(sum(c.values()) for c in confusion.values())
    right = sum(c.get(t, 0) for t, c in confusion.items())
    return {
        "accuracy": round(100.0 * right / n, 2) if n else None,
        "per_task_accuracy": per_task,
        "confusion": confusion,
        "scores": scores,
        "AA": round(sum(scores.values()) / len(scores), 4) if scores else None,
    }
