"""Measure dW = W - W0 of a live model during a run (``analysis:`` in the config).

W0 is captured once, right after the strategies have set the model up: a copy of every
weight that trains directly (full fine-tuning), nothing for LoRA layers, whose update is
B @ A * scale and is read from the adapter itself (PEFT's ``get_delta_weight``).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from retain.analysis.updates import next_token_kl, summarize
from retain.evaluation.scoring import eval_mode, left_pad, score_task


def _lora_layers(model) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Logits of the token after each prompt (left-padded batches), on the CPU."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[start:start + batch_size]]
            ids, mask = left_pad(enc, tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
            out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


class UpdateTracker:
    """Records norm, density, rank of dW, KL to the base model and (optionally) the probe."""

    def __init__(self, ctx, options) -> None:
        self.options = options
        model = ctx.model
        self.base = {n: p.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad and "lora_" not in n}
        # Held-out prompts: test inputs taken round-robin over the tasks, so every task counts.
        stream, prompts = ctx.stream, []
        columns = [[t.prompt(ctx.tokenizer, ex) for ex in t.test] for t in stream.tasks]
        for row in range(max((len(c) for c in columns), default=0)):
            prompts += [c[row] for c in columns if row < len(c)]
        self.prompts = prompts[: options.kl_prompts]
        self.base_logits = next_token_logits(model, ctx.tokenizer, self.prompts) if self.prompts else None

    def due(self, step: int, steps: int) -> bool:
        """After step ``step`` (1-based) of ``steps``: every ``every`` steps and at the phase end."""
        return step == steps or bool(self.options.every and step % self.options.every == 0)

    def pairs(self, model) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name, w0 in self.base.items():
            yield name, w0, params[name]
        for name, module in _lora_layers(model):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                w0 = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in adapters)
                yield f"{name}.weight", w0, w0 + delta.to(w0.dtype)

    @torch.no_grad()
    def measure(self, ctx, phase: int, step: int, global_step: int, score: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        o = self.options
        record = {"phase": phase, "step": step, "global_step": global_step,
                  **summarize(self.pairs(ctx.model), taus=tuple(o.taus), energy=o.energy, ranks=o.ranks)}
        if self.base_logits is not None:
            logits = next_token_logits(ctx.model, ctx.tokenizer, self.prompts)
            record["kl_base"] = next_token_kl(logits, self.base_logits)
        ev = ctx.config.eval
        if score and o.tasks:
            record["scores"] = {t.name: score_task(ctx.model, ctx.tokenizer, t, batch_size=ev.batch_size,
                                                   max_new_tokens=ev.max_new_tokens, max_length=ev.max_length)
                                for t in ctx.stream.tasks}
        if score and o.probe and ctx.stream.probes:
            # The probes' mean, as the phase-end evaluations record it.
            values = [score_task(ctx.model, ctx.tokenizer, p, batch_size=ev.batch_size,
                                 max_new_tokens=ev.max_new_tokens, max_length=ev.max_length) for p in ctx.stream.probes]
            record["probe"] = sum(values) / len(values)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record
