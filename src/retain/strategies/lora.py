"""One PEFT LoRA adapter trained through the whole stream; the base weights stay frozen."""

from __future__ import annotations

from pathlib import Path

from retain.strategies._lora import LoraOptions, save_adapter, wrap_with_lora
from retain.strategies.base import Context, Strategy, register

__all__ = ["Lora", "LoraOptions"]


@register
class Lora(Strategy):
    name = "lora"
    not_private = ""
    data_parallel = ""
    sharded = ""  # adapters added at setup, before the weights are sharded
    summary = "one shared LoRA adapter trained through the stream, base weights frozen"
    task_free = True
    options_key = "lora"
    Options = LoraOptions
    owns_parameters = True

    def setup(self, ctx: Context):
        return wrap_with_lora(ctx.model, self.options)

    def export(self, ctx: Context, run_dir: Path) -> None:
        save_adapter(ctx.model, "default", run_dir / "adapters" / "lora")
