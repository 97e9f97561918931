"""What a resumed run needs: the trained tensors and a JSON state, both written atomically.

Only parameters that were trainable in some phase are saved (all weights for full
fine-tuning, the adapters for LoRA): the rest equal the base model, which is reloaded.
Every checkpoint writes its tensor files under new names (its serial number), then
``state.json``, which names them, and only then deletes the files of the checkpoint
before: a kill at any moment leaves a state.json whose files are all complete.

A checkpoint inside a phase keeps the phase-start files (the previous phase's end) and
adds the phase's trainable tensors with their optimizer, scheduler and RNG states; a
resumed run starts the phase again from its start files, replays the batch draws up to
the step, and loads those (see ``Run.train_phase``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retain import sharding
from retain.errors import RetainError
from retain.io import atomic_write, atomic_write_json
from retain.state import Progress, RunState

STATE = "state.json"
#: Names of a run directory written before checkpoint files carried serial numbers.
LEGACY = {"trained": "trained.safetensors", "strategy": "strategy.safetensors"}


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RetainError(f"{path} is missing; the checkpoint cannot be resumed")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise RetainError(f"{path}: corrupt checkpoint tensors ({exc})") from None


def _model_tensors(model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The full tensors of ``keys`` (sharded weights gathered: a collective on every process)."""
    wanted = set(keys)
    return sharding.full({k: v for k, v in model.state_dict().items() if k in wanted})


def _write_state(run_dir: Path, state: RunState) -> None:
    atomic_write_json(folder(run_dir) / STATE, state.to_dict())
    # Only now are the previous checkpoint's files unreferenced.
    keep = set(state.files.values()) | {STATE}
    if state.progress is not None:
        keep |= {state.progress.tensors, state.progress.optimizer}
    for path in folder(run_dir).iterdir():
        if path.is_file() and path.name not in keep and not path.name.startswith("."):
            path.unlink(missing_ok=True)


def save(run_dir: Path, state: RunState, model: torch.nn.Module,
         strategy_tensors: dict[str, torch.Tensor] | None = None, write: bool = True) -> None:
    """A checkpoint between phases: trained tensors, strategy tensors, then state.json.
    ``write`` false: only take part in gathering sharded weights (a process other than the main one)."""
    trained = _model_tensors(model, state.trained_keys) if state.trained_keys else {}
    strategy_tensors = sharding.full(strategy_tensors or {})  # a strategy's sharded tensors (EWC's), gathered
    if not write:
        return
    state.serial += 1
    files: dict[str, str] = {}
    if state.trained_keys:
        files["trained"] = f"trained-{state.serial}.safetensors"
        _save_tensors(folder(run_dir) / files["trained"], trained)
    if strategy_tensors:
        files["strategy"] = f"strategy-{state.serial}.safetensors"
        _save_tensors(folder(run_dir) / files["strategy"], strategy_tensors)
    state.files = files
    _write_state(run_dir, state)


def split_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by ``{"__tensor__": key}`` (the tensor goes to ``tensors``):
    a strategy's phase state may hold tensors (a Fisher estimate), state.json holds JSON."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {k: split_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, tensors) for v in value]
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def save_progress(run_dir: Path, state: RunState, progress: Progress, model: torch.nn.Module, keys: list[str],
                  optimizer: Any = None, scheduler: Any = None, write: bool = True) -> None:
    """A checkpoint inside a phase; the phase-start files stay as they are. ``write``: as in ``save``."""
    tensors = _model_tensors(model, keys)
    moments = sharding.full_optimizer_state(optimizer.state_dict()) if optimizer is not None else None
    if not write:
        return
    state.serial += 1
    progress.tensors = f"progress-{state.serial}.safetensors"
    _save_tensors(folder(run_dir) / progress.tensors, tensors)
    strategy_tensors: dict[str, torch.Tensor] = {}
    progress.strategy = split_tensors(progress.strategy, strategy_tensors)
    extra: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                             "strategy_tensors": strategy_tensors}
    if torch.cuda.is_available():
        extra["cuda_rng"] = torch.cuda.get_rng_state_all()
    if optimizer is not None:
        extra["optimizer"] = moments
        extra["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    progress.optimizer = f"optimizer-{state.serial}.pt"
    atomic_write(folder(run_dir) / progress.optimizer, lambda tmp: torch.save(extra, tmp))
    state.progress = progress
    try:
        _write_state(run_dir, state)
    finally:
        state.progress = None


def restore_progress(run_dir: Path, progress: Progress, model: torch.nn.Module, optimizer: Any = None,
                     scheduler: Any = None) -> dict[str, Any]:
    """Weights, optimizer, scheduler and RNG states as they were at ``progress``'s step;
    returns the strategies' phase state with its tensors put back."""
    path = folder(run_dir) / str(progress.tensors)
    tensors = _load_tensors(path)
    result = model.load_state_dict(sharding.fit(model, tensors), strict=False)
    if result.unexpected_keys:
        raise RetainError(f"{path}: tensors do not fit the model (e.g. {result.unexpected_keys[0]})")
    opt_path = folder(run_dir) / str(progress.optimizer)
    if not opt_path.is_file():
        raise RetainError(f"{opt_path} is missing; the checkpoint cannot be resumed")
    try:
        extra = torch.load(opt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise RetainError(f"{opt_path}: corrupt optimizer state ({exc})") from None
    if optimizer is not None:
        optimizer.load_state_dict(sharding.fit_optimizer_state(optimizer, extra["optimizer"]))
        if scheduler is not None and extra.get("scheduler") is not None:
            scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return join_tensors(progress.strategy, extra.get("strategy_tensors") or {})


def load_state(run_dir: Path) -> RunState | None:
    path = folder(run_dir) / STATE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RetainError(f"{path}: corrupt checkpoint state ({exc})") from None
    if not isinstance(data, dict):
        raise RetainError(f"{path}: corrupt checkpoint state (not a JSON object)")
    state = RunState.from_dict(data, source=str(path))
    if not state.files:  # a run directory from before serial-numbered files
        state.files = {role: name for role, name in LEGACY.items() if (folder(run_dir) / name).is_file()}
    return state


def restore_tensors(run_dir: Path, model: torch.nn.Module, state: RunState) -> None:
    if not state.trained_keys:
        return
    path = folder(run_dir) / state.files.get("trained", LEGACY["trained"])
    tensors = _load_tensors(path)
    missing = sorted(set(state.trained_keys) - set(tensors))
    if missing:
        raise RetainError(f"{path}: lacks {len(missing)} trained tensors (e.g. {missing[0]})")
    result = model.load_state_dict(sharding.fit(model, tensors), strict=False)
    if result.unexpected_keys:
        raise RetainError(f"{path}: tensors do not fit the model (e.g. {result.unexpected_keys[0]})")


def load_strategy_tensors(run_dir: Path, state: RunState,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Onto the model's device, where the strategy made them (EWC's anchors meet the weights there)."""
    name = state.files.get("strategy")
    device = torch.device(device)
    # A multi-process CPU run's device is "cpu:0", which safetensors does not accept.
    where = "cpu" if device.type == "cpu" else str(device)
    return _load_tensors(folder(run_dir) / name, device=where) if name else {}
