"""Scoring a task, batched: choice log-likelihood, exact match of greedy answers, perplexity.

Written by hand rather than through an evaluation harness because every score must use
the run's own prompt format, adapter routing and batching, on tiny models as on real ones.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from retain.streams.task import Example, Task

Advance = Callable[[int], None]


def _noop(_: int) -> None:
    pass


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """The model in eval mode (no dropout) inside, in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode_pair(tokenizer, prompt: str, continuation: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of prompt+continuation and the continuation's length; prompt cut from the left."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p) + len(c) > max_length:
        keep = max(max_length - len(c), 1)
        p = p[-keep:]
        c = c[: max_length - len(p)]
    # With no prompt token (plain text and no BOS) the first token has no context to score.
    return p + c, len(c) if p else max(len(c) - 1, 0)


@torch.no_grad()
def continuation_logprobs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32, advance: Advance = _noop
) -> list[tuple[float, int]]:
    """Sum of log p(continuation | prompt) and its token count, for each pair."""
    encoded = [encode_pair(tokenizer, p, c) for p, c in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    device, pad = _device(model), tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(device)
        tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, i in enumerate(idx):
            seq, n = encoded[i]
            end = len(seq) - 1
            out[i] = (tok_logp[row, end - n : end].sum().item(), n)
        advance(len(idx))
    return out


def choice_predictions(model, tokenizer, task: Task, examples: Sequence[Example], batch_size: int = 32,
                       advance: Advance = _noop) -> list[int]:
    """Index of the highest-likelihood option for each example."""
    pairs, owners = [], []
    for k, ex in enumerate(examples):
        prompt = task.prompt(tokenizer, ex)
        for option in ex.options or ():
            pairs.append((prompt, task.target(option)))
            owners.append(k)
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size, advance)
    best: list[tuple[float, int]] = [(-math.inf, -1)] * len(examples)
    counters = [0] * len(examples)
    for owner, (lp, _) in zip(owners, scores):
        j = counters[owner]
        counters[owner] += 1
        if lp > best[owner][0]:
            best[owner] = (lp, j)
    return [j for _, j in best]


_PUNCT = re.compile(f"^[{re.escape(string.punctuation)}\\s]+|[{re.escape(string.punctuation)}\\s]+$")


def normalize(text: str) -> str:
    """First line, lower case, outer punctuation and inner runs of spaces removed."""
    text = text.strip().split("\n", 1)[0].lower()
    return " ".join(_PUNCT.sub("", text).split())


def left_pad(encoded: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of sequences padded on the left (the last token aligned)."""
    width = max(len(seq) for seq in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 32,
             advance: Advance = _noop) -> list[str]:
    """Greedy answers, left-padded batches, decoded without special tokens."""
    device = _device(model)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
        advance(len(idx))
    return answers


def score_task(model, tokenizer, task: Task, examples: Sequence[Example] | None = None, *, batch_size: int = 32,
               max_new_tokens: int = 16, advance: Advance = _noop) -> float:
    """The task's score: accuracy in percent, or perplexity for ``perplexity`` tasks."""
    examples = list(task.test if examples is None else examples)
    if not examples:
        return float("nan")
    with eval_mode(model):
        if task.metric == "choice":
            preds = choice_predictions(model, tokenizer, task, examples, batch_size, advance)
            return 100.0 * sum(p == ex.answer_index for p, ex in zip(preds, examples)) / len(examples)
        if task.metric == "exact_match":
            prompts = [task.prompt(tokenizer, ex) for ex in examples]
            answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, advance)
            hits = sum(normalize(a) == normalize(ex.output) for a, ex in zip(answers, examples))
            return 100.0 * hits / len(examples)
        pairs = [(task.prompt(tokenizer, ex) if ex.input else "", task.target(ex.output)) for ex in examples]
        scores = continuation_logprobs(model, tokenizer, pairs, batch_size, advance)
        nll, count = -sum(s for s, _ in scores), sum(n for _, n in scores)
        return math.exp(nll / max(count, 1))


def work_units(task: Task, n_examples: int) -> int:
    """Sequences the scorer runs for a task (for progress bars)."""
    if task.metric == "choice":
        return sum(len(ex.options or ()) for ex in task.test[:n_examples])
    return n_examples
