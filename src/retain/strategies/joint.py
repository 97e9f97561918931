"""Multitask training on all tasks at once: the reference continual methods are compared to."""

from __future__ import annotations

from retain.strategies.base import Strategy, register


@register
class Joint(Strategy):
    name = "joint"
    not_private = ""
    data_parallel = ""
    sharded = ""
    summary = "all tasks trained together in one phase (the multitask reference); combine with lora for joint LoRA"

    def plan(self, tasks):
        # One phase; the loop gives a phase max_steps per task, so compute matches the stream.
        return [list(tasks)]
