"""What a resumed run needs: the trained tensors and a JSON state, both written atomically.

Only parameters that were trainable in some phase are saved (all weights for full
fine-tuning, the adapters for LoRA): the rest equal the base model, which is reloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from retain.errors import RetainError
from retain.io import atomic_write, atomic_write_json

STATE = "state.json"
TENSORS = "trained.safetensors"
STRATEGY_TENSORS = "strategy.safetensors"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def save(run_dir: Path, state: dict[str, Any], model: torch.nn.Module, keys: list[str],
         strategy_tensors: dict[str, torch.Tensor] | None = None) -> None:
    folder = run_dir / "checkpoints"
    if keys:
        wanted = set(keys)
        _save_tensors(folder / TENSORS, {k: v for k, v in model.state_dict().items() if k in wanted})
    if strategy_tensors:
        _save_tensors(folder / STRATEGY_TENSORS, strategy_tensors)
    # state.json last: it is what says the tensors beside it are complete.
    atomic_write_json(folder / STATE, state)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "checkpoints" / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetainError(f"{path}: corrupt checkpoint state ({exc.msg})") from None


def restore_tensors(run_dir: Path, model: torch.nn.Module, keys: list[str]) -> None:
    if not keys:
        return
    path = run_dir / "checkpoints" / TENSORS
    if not path.is_file():
        raise RetainError(f"{path} is missing; the checkpoint cannot be resumed")
    tensors = load_file(str(path))
    missing = sorted(set(keys) - set(tensors))
    if missing:
        raise RetainError(f"{path}: lacks {len(missing)} trained tensors (e.g. {missing[0]})")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise RetainError(f"{path}: tensors do not fit the model (e.g. {result.unexpected_keys[0]})")


def load_strategy_tensors(run_dir: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Onto the model's device, where the strategy made them (EWC's anchors meet the weights there)."""
    path = run_dir / "checkpoints" / STRATEGY_TENSORS
    return load_file(str(path), device=str(device)) if path.is_file() else {}
