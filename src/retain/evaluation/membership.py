"""A loss-threshold membership-inference check: does the model give away which examples it trained on?

An attacker who sees an example's loss guesses "trained on it" below a threshold. Over all
thresholds, its success is the AUC of member losses against non-member losses: the
probability that a random training example (member) has a lower loss than a random held-out
test example (non-member). 0.5 means the losses tell nothing; the base model's AUC is the
floor the task's own train/test difference sets, so the check reports both.
"""

from __future__ import annotations

import random
from typing import Any, Callable, ContextManager

from retain.evaluation.scoring import continuation_logprobs, eval_mode
from retain.streams.task import Item, Task


def auc(members: list[float], nonmembers: list[float]) -> float:
    """P(member loss < non-member loss), ties counting one half (the Mann-Whitney statistic
    over m*n, which is the threshold attack's ROC AUC). Written out: it is a few lines, and
    the base install has no statistics package."""
    pairs = sorted([(x, 1) for x in members] + [(x, 0) for x in nonmembers])
    ranks: list[float] = [0.0] * len(pairs)
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    m, n = len(members), len(nonmembers)
    member_rank_sum = sum(r for r, (_, is_member) in zip(ranks, pairs) if is_member)
    # Ranks ascend with loss: members ranked low (small losses) mean a high AUC.
    return (m * n + m * (m + 1) / 2 - member_rank_sum) / (m * n)


def split(task: Task, tokenizer, n: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Up to ``n`` training examples and as many held-out test examples, a seeded sample."""
    rng = random.Random(f"membership/{seed}/{task.name}")
    k = min(n, len(task.train), len(task.test))
    members = rng.sample(task.items(tokenizer), k)
    nonmembers = rng.sample(task.items(tokenizer, task.test), k)
    return members, nonmembers


def losses(model, tokenizer, items: list[Item], batch_size: int) -> list[float]:
    """Each example's mean token loss on its answer (and end of text), as it was trained."""
    pairs = [(it.prompt, it.target + tokenizer.eos_token) for it in items]
    with eval_mode(model):
        scored = continuation_logprobs(model, tokenizer, pairs, batch_size)
    return [-lp / max(n, 1) for lp, n in scored]


def membership_check(model, tokenizer, tasks: list[Task], n: int, seed: int, batch_size: int,
                     route: Callable[[str], ContextManager]) -> dict[str, Any]:
    """Per task (scored under ``route(task)``): members, non-members and the attack's AUC; and the mean AUC."""
    out: dict[str, Any] = {}
    for task in tasks:
        members, nonmembers = split(task, tokenizer, n, seed)
        if not members:
            continue
        with route(task.name):
            m = losses(model, tokenizer, members, batch_size)
            h = losses(model, tokenizer, nonmembers, batch_size)
        out[task.name] = {"auc": round(auc(m, h), 4), "n": len(members),
                          "member_loss": round(sum(m) / len(m), 4), "nonmember_loss": round(sum(h) / len(h), 4)}
    mean = sum(v["auc"] for v in out.values()) / len(out) if out else None
    return {"tasks": out, "auc": round(mean, 4) if mean is not None else None}
