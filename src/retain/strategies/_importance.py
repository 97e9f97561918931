"""Parameter importance from a task's data: diagonal Fisher and accumulated gradient magnitude.

Shared by ``ewc`` and ``sparse`` (a module starting with ``_`` is not a strategy).
"""

from __future__ import annotations

import random

import torch

from retain import sharding
from retain.batching import collate
from retain.evaluation.scoring import eval_mode
from retain.lm_loss import lm_outputs
from retain.parallel import SINGLE, Processes
from retain.streams.task import Item


def named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(model, tokenizer, items: list[Item], params: dict[str, torch.nn.Parameter], n: int,
                    max_length: int, seed: int, processes: Processes = SINGLE) -> dict[str, torch.Tensor]:
    """F_i = mean over n examples of (d log p(target | prompt) / d theta_i)^2.

    One backward pass per example: the per-example gradient is what the estimate needs
    (the square of a batch gradient is not the Fisher). Scored in eval mode, so dropout
    does not add noise to the estimate. In a data-parallel run each process takes a share of
    the sample and the sums are added across processes.
    """
    sample = random.Random(seed).sample(items, min(n, len(items)))
    total = len(sample)
    if processes.sharded:
        return _sharded_fisher(model, tokenizer, sample, params, max_length, processes.count)
    sample = processes.share(sample)
    device = next(model.parameters()).device
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    names, tensors = list(params), list(params.values())
    with eval_mode(model):
        for item in sample:
            batch = {k: v.to(device) for k, v in collate(tokenizer, [item], max_length).items()}
            n_target = int((batch["labels"][:, 1:] != -100).sum())
            log_likelihood = -lm_outputs(model, batch).loss * n_target
            grads = torch.autograd.grad(log_likelihood, tensors, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    fisher[name] += g.detach().float() ** 2
    processes.sum_tensors(list(fisher.values()))
    return {k: v / max(total, 1) for k, v in fisher.items()}


def _sharded_fisher(model, tokenizer, sample: list[Item], params: dict[str, torch.nn.Parameter], max_length: int,
                    copies: int) -> dict[str, torch.Tensor]:
    """The diagonal Fisher on sharded weights, each process holding its shard of it.

    ``torch.autograd.grad`` cannot reach a shard: FSDP computes the gathered weight's gradient
    and reduce-scatters (sums) it into the shard's ``.grad``. So each example's gradient comes
    from ``backward()``, with every process running the same example in lockstep: each shard's
    gradient is then ``copies`` times the example's, divided out before squaring."""
    device = next(model.parameters()).device
    parts = {k: torch.zeros_like(sharding.local(p), dtype=torch.float32) for k, p in params.items()}
    with eval_mode(model):
        for item in sample:
            for p in params.values():
                p.grad = None
            batch = {k: v.to(device) for k, v in collate(tokenizer, [item], max_length).items()}
            n_target = int((batch["labels"][:, 1:] != -100).sum())
            (-lm_outputs(model, batch).loss * n_target).backward()
            for name, p in params.items():
                if p.grad is not None:
                    parts[name] += (sharding.local(p.grad).float() / copies) ** 2
    for p in params.values():
        p.grad = None
    return {k: sharding.shaped_like(params[k], v / max(len(sample), 1)) for k, v in parts.items()}


def gradient_magnitude(model, tokenizer, items: list[Item], params: dict[str, torch.nn.Parameter], n: int,
                       batch_size: int, max_length: int, seed: int) -> dict[str, torch.Tensor]:
    """Sum over mini-batches of |d loss / d theta_i|: cheap importance for selecting weights."""
    sample = random.Random(seed).sample(items, min(n, len(items)))
    device = next(model.parameters()).device
    total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    names, tensors = list(params), list(params.values())
    for start in range(0, len(sample), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenizer, sample[start : start + batch_size], max_length).items()}
        grads = torch.autograd.grad(lm_outputs(model, batch).loss, tensors, allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                total[name] += g.detach().float().abs()
    return total
