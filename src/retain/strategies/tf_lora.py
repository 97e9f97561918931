"""Task-free LoRA expansion: a new LoRA adapter wherever the training loss says the data shifted.

Nobody says when a task ends. The plateau/peak detector of ``tf-ewc`` (``_plateau``) watches
the step losses; at each detected shift the adapter that was training is frozen and the next one
starts (fresh: LoRA's B is zero, so it starts from the base model). Each adapter keeps the
centroid of the inputs it trained on (the frozen base model's mean-pooled hidden states,
as ``lora-per-task``'s router), and at inference each input is answered by the adapter of
its nearest centroid: the model routes per input, so no task identity is ever needed,
neither while training nor when scored.

The adapters are PEFT LoRA adapters, routed per row through PEFT's mixed-batch inference
(``adapter_names``); they are allocated up front (``max_adapters``) so that the optimizer
the loop builds at the phase start holds them all: an adapter not yet opened, or already
frozen, takes no part in the forward pass and gets no gradient, so AdamW leaves it alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field

from retain.embeddings import ModelWrapper, embed_texts, pooled_query
from retain.io import atomic_write_json
from retain.streams.task import Item
from retain.strategies._lora import LoraOptions, save_adapter, wrap_with_lora
from retain.strategies._plateau import LossWatch
from retain.strategies.base import Context, Strategy, register

#: PEFT's name for "no adapter" in a mixed batch.
BASE = "__base__"


class TaskFreeLoraOptions(LoraOptions):
    max_adapters: int = Field(default=8, ge=1, le=64, description="adapters allocated; shifts after the last one "
                              "opened are recorded but the last adapter keeps training")
    window: int = Field(default=10, ge=2, description="step losses in the detector's window")
    plateau_cv: float = Field(default=0.2, gt=0, description="a plateau: the window's standard deviation "
                              "below this fraction of its mean")
    peak_ratio: float = Field(default=1.5, gt=1, description="a shift: the window's mean above this many times "
                              "the last plateau's")
    centroid_samples: int = Field(default=128, ge=1, description="training inputs per adapter averaged into its "
                                  "routing centroid (the first ones it trains on)")


def segment(k: int) -> str:
    return f"segment-{k}"


class SegmentRouter(ModelWrapper):
    """The PEFT model, answering each input (outside training) with the adapter of its nearest centroid."""

    def __init__(self, model, hidden_size: int) -> None:
        super().__init__(model)
        self.sums = torch.zeros(0, hidden_size)  # one row per adapter opened: sum of unit embeddings
        self.counts: list[int] = []
        self.last_routes: list[str] = []

    def centroids(self) -> tuple[list[str], torch.Tensor]:
        used = [k for k, n in enumerate(self.counts) if n]
        return [segment(k) for k in used], F.normalize(self.sums[used], dim=1)

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """The base model alone. PEFT's ``disable_adapter`` also resets which LoRA weights
        require grad (to the active adapter's): the flags the loop set are put back."""
        flags = [(p, p.requires_grad) for p in self.base.parameters()]
        try:
            with self.base.disable_adapter():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    @torch.no_grad()
    def routes(self, input_ids, attention_mask, query_mask=None) -> list[str]:
        names, centroids = self.centroids()
        if not names:
            return [BASE] * input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.base_only():
            q = pooled_query(self.base, input_ids, attention_mask, query_mask=query_mask)
        return [names[i] for i in (q @ centroids.to(q.device).T).argmax(1).tolist()]

    def _routed(self, input_ids, attention_mask, kwargs: dict, query_mask=None) -> dict:
        if self.training or input_ids is None:
            return kwargs
        self.last_routes = self.routes(input_ids, attention_mask, query_mask)
        return {**kwargs, "adapter_names": self.last_routes}

    def forward(self, input_ids=None, attention_mask=None, query_mask=None, **kwargs):
        kwargs = self._routed(input_ids, attention_mask, kwargs, query_mask)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        kwargs = self._routed(input_ids, attention_mask, kwargs)
        return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@register
class TaskFreeLora(Strategy):
    name = "tf-lora"
    not_private = "its routing centroids are means of private training inputs, kept without noise"
    data_parallel = "it opens adapters at shifts detected in online mode, which runs in one process"
    sharded = "it runs in online mode, which runs in one process"
    not_exportable = ("it answers each input with the adapter of its nearest centroid; its adapters are saved "
                      "under adapters/segment-<k>/ with the centroids in adapters/routing.json, but a server "
                      "would have to do the routing")
    summary = "task-free LoRA expansion: a new adapter at each loss shift, each input routed to its nearest adapter"
    options_key = "tf_lora"
    Options = TaskFreeLoraOptions
    owns_parameters = True
    freezes_earlier = True
    rewrites_input = True
    task_free = True

    def __init__(self, options: TaskFreeLoraOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.watch = LossWatch(o.window, o.plateau_cv, o.peak_ratio)
        self.active = 0
        self.shifts: list[int] = []
        self.opened: list[int] = [0]  # the step after which each adapter began
        self.router: SegmentRouter | None = None

    def setup(self, ctx: Context):
        peft = wrap_with_lora(ctx.model, self.options, adapter_name=segment(0))
        for k in range(1, self.options.max_adapters):
            peft.add_adapter(segment(k), self.options.peft_config())
        self.router = SegmentRouter(peft, ctx.model.config.hidden_size)
        return self.router

    def _peft(self, ctx: Context):
        return ctx.accelerator.unwrap_model(ctx.model).base

    def before_task(self, ctx: Context, tasks) -> None:
        self._peft(ctx).set_adapter(segment(self.active))

    def trainable_parameters(self, ctx: Context):
        # Every adapter, opened or not: the optimizer is built once per phase, and an adapter
        # opened at a shift inside the phase must already be in it.
        return [p for n, p in self._peft(ctx).named_parameters() if ".lora_" in n]

    def batches(self, ctx: Context, tasks, batches: Iterator[list[Item]]) -> Iterator[list[Item]]:
        return self.watch.watched(batches, lambda events: self.observe(ctx, events),
                                  lambda batch: self.accumulate(ctx, batch))

    def observe(self, ctx: Context, events: list[tuple[int, str]]) -> None:
        """Open the next adapter at a shift."""
        for step, event in events:
            if event != "shift":
                continue
            self.shifts.append(step)
            if self.active + 1 < self.options.max_adapters:
                self.active += 1
                self.opened.append(step)
                self._peft(ctx).set_adapter(segment(self.active))

    def accumulate(self, ctx: Context, batch: list[Item]) -> None:
        """Add the batch's inputs to the training adapter's centroid, up to ``centroid_samples``."""
        router = self._router(ctx)
        while len(router.counts) <= self.active:
            router.counts.append(0)
            router.sums = torch.cat([router.sums, router.sums.new_zeros(1, router.sums.shape[1])])
        room = self.options.centroid_samples - router.counts[self.active]
        prompts = [item.prompt for item in batch[:max(room, 0)]]
        if not prompts:
            return
        with router.base_only():
            vectors = embed_texts(router.base, ctx.tokenizer, prompts, ctx.config.eval.batch_size,
                                  ctx.config.train.max_length)
        router.sums[self.active] += vectors.sum(0)
        router.counts[self.active] += len(prompts)

    def _router(self, ctx: Context) -> SegmentRouter:
        return ctx.accelerator.unwrap_model(ctx.model)

    def extra_loss(self, ctx: Context, batch, outputs, items):
        self.watch.record(outputs)
        return None

    def after_task(self, ctx: Context, tasks) -> None:
        self.observe(ctx, self.watch.drain())
        if ctx.run_dir is not None:
            self.save(ctx, ctx.run_dir / "adapters")

    def save(self, ctx: Context, dest: Path) -> None:
        router, peft = self._router(ctx), self._peft(ctx)
        names, centroids = router.centroids()
        for name in names:
            save_adapter(peft, name, dest / name)
        atomic_write_json(dest / "routing.json", {
            "adapters": names, "centroids": centroids.tolist(),
            "embedding": "mean-pooled last hidden state of the base model (adapters off) over the prompt's tokens, "
                         "L2-normalized; each input goes to the adapter of the highest cosine"})

    def stats(self) -> dict:
        counts = self.router.counts if self.router is not None else []
        return {"adapters": self.active + 1, "shifts_at_step": list(self.shifts),
                "adapter_opened_at_step": list(self.opened), "centroid_inputs": list(counts),
                "shifts_past_last_adapter": max(len(self.shifts) - (self.options.max_adapters - 1), 0)}

    # -- checkpoints ----------------------------------------------------------------------
    def _json(self) -> dict:
        router = self.router
        return {**self.watch.state(), "active": self.active, "shifts": list(self.shifts), "opened": list(self.opened),
                "counts": list(router.counts) if router is not None else []}

    def _load_json(self, ctx: Context, state: dict) -> None:
        self.watch.load(state)
        self.active = state["active"]
        self.shifts, self.opened = list(state["shifts"]), list(state["opened"])
        self._router(ctx).counts = list(state["counts"])
        self._peft(ctx).set_adapter(segment(self.active))

    def state_dict(self) -> dict:
        router = self.router
        return {**self._json(), "sums": router.sums.tolist() if router is not None else []}

    def load_state_dict(self, ctx: Context, state: dict) -> None:
        if state:
            self._load_json(ctx, state)
            router = self._router(ctx)
            router.sums = torch.tensor(state["sums"], dtype=torch.float32).reshape(len(state["counts"]),
                                                                                 router.sums.shape[1])

    def phase_state(self) -> dict:
        return {**self._json(), "sums": self.router.sums.clone()}

    def load_phase_state(self, ctx: Context, state: dict) -> None:
        self._load_json(ctx, state)
        self._router(ctx).sums = state["sums"].clone()
