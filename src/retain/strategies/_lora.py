"""PEFT LoRA helpers shared by the LoRA strategies (lora, lora-per-task, olora, merge)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict, Field

from retain.io import atomic_write_dir


class LoraOptions(BaseModel):
    """LoRA hyper-parameters (shared by ``lora`` and ``lora-per-task``)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha,
            lora_dropout=self.dropout, target_modules=list(self.target_modules),
        )


def wrap_with_lora(model, options: LoraOptions, adapter_name: str = "default"):
    try:
        return get_peft_model(model, options.peft_config(), adapter_name=adapter_name)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ValueError(f"lora.target_modules: {exc}; module names in this model include: {', '.join(names[:30])}") from None


def save_adapter(model, adapter: str, dest: Path) -> Path:
    """Write one adapter as a standalone PEFT folder (adapter_config.json + safetensors)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=[adapter])
        # PEFT nests any adapter not called "default" in a sub-folder of that name.
        nested = tmp / adapter
        if adapter != "default" and nested.is_dir():
            for f in nested.iterdir():
                f.rename(tmp / f.name)
            nested.rmdir()

    return atomic_write_dir(dest, write)


Method = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]
#: Methods that trim each update to ``density`` first; their weights default to 1 (TIES sums
#: the elected entries), the others' to 1/T (an average of the task updates).
TRIMMING = {"ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"}


def merge_adapters(model, adapters: list[str], weights: list[float], method: str, name: str,
                   density: float = 0.5) -> None:
    """Add adapter ``name`` to a PEFT model: ``adapters`` combined by ``method`` (replaces ``name``)."""
    if name in model.peft_config:
        model.delete_adapter(name)
    extra = {"density": density} if method in TRIMMING else {}
    model.add_weighted_adapter(adapters, weights, name, combination_type=method, **extra)


@contextmanager
def use_adapter(model, name: str):
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
