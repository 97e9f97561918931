"""Sharded training: each process holds a slice of every weight, gradient and optimizer state.

retain shards with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``), applied by the run
itself rather than by Accelerate: Accelerate wraps a model only on GPU processes and wants the
optimizer prepared together with the model, while retain makes a new optimizer every phase and
must run (and be tested) the same way on CPU processes over gloo. Two modes, named after the
DeepSpeed stages they match:

- ``zero3``: weights sharded at rest and after each layer's forward (FSDP's FULL_SHARD);
- ``zero2``: weights kept gathered from a forward to its backward (FSDP's SHARD_GRAD_OP),
  gradients and optimizer state sharded.

What the loop does differently when a model is sharded:

- the step: each process still trains on its share of the global batch; FSDP reduce-scatters
  the gradients as a sum (the loop has already divided the token losses by the global count),
  so the step equals the one-process step, as in a replicated data-parallel run;
- evaluation runs in lockstep: every forward gathers weights from all processes, so every
  process scores every item (generation with ``synced_gpus``) instead of a share of them;
- checkpoints and adapters hold full tensors (gathered on every process, written by the main
  one), so a sharded run resumes with any number of processes, sharded or not.

Run as one process, a sharded config shards into one (a group of one made here): the same
run, which is how the sharded path is checked on a single GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

#: Whether ``shard`` started the process group (a run of one process), so ``release`` ends it.
_own_group: list[bool] = []
#: What an ``accelerate launch`` with an FSDP config sets, and the mode each value means.
ACCELERATE_FLAG = "ACCELERATE_USE_FSDP"
STRATEGY_ENV = {"FULL_SHARD": "zero3", "SHARD_GRAD_OP": "zero2", "1": "zero3", "2": "zero2"}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def requested(config: Any) -> str | None:
    """The sharding mode of this run: ``train.sharding``, or an ``accelerate launch`` FSDP
    config's (FULL_SHARD / reshard after forward: zero3; SHARD_GRAD_OP: zero2)."""
    from retain.errors import RetainError

    mode = None if config.train.sharding == "none" else config.train.sharding
    if not _truthy(ACCELERATE_FLAG):
        return mode
    if os.environ.get("FSDP_VERSION", "1") == "2":  # fsdp_version 2 configs say fsdp_reshard_after_forward
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
        launched = "zero2" if reshard in ("false", "0", "no", "shard_grad_op") else "zero3"
    else:
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy not in STRATEGY_ENV:
            raise RetainError(f"FSDP_SHARDING_STRATEGY={strategy} (the accelerate config's fsdp_sharding_strategy): "
                              "retain shards with FULL_SHARD (zero3) or SHARD_GRAD_OP (zero2)")
        launched = STRATEGY_ENV[strategy]
    if mode is not None and mode != launched:
        raise RetainError(f"train.sharding: {mode} contradicts the accelerate FSDP config, which asks for {launched}; "
                          "set one of them")
    return launched


@contextmanager
def without_accelerate_fsdp() -> Iterator[None]:
    """Build the Accelerator as for a plain multi-process run: under an FSDP launch config it
    would wrap the model and optimizer itself (on GPUs only), which retain does (see above)."""
    saved = os.environ.pop(ACCELERATE_FLAG, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ACCELERATE_FLAG] = saved


def check(config: Any, stack: Any, mode: str | None, processes: int) -> None:
    """Refuse, before anything runs, a sharded run that would not do what it says."""
    from retain.errors import RetainError
    from retain.parallel import first_refusal

    if _truthy("ACCELERATE_USE_DEEPSPEED"):
        raise RetainError("ACCELERATE_USE_DEEPSPEED: retain does not run under DeepSpeed's engine (it takes over the "
                          "backward pass, gradient reduction and optimizer step, which retain's loop and strategies "
                          "own); set train.sharding: zero2 or zero3 (the same partitioning, through torch's FSDP2) "
                          "and launch with `torchrun` or `accelerate launch --multi_gpu`")
    if mode is None:
        return
    where = f"train.sharding: {mode}"
    refused = first_refusal(stack, "sharded", "it has not been checked to give the one-process result on sharded "
                            "weights")
    if refused:
        name, why, works = refused
        raise RetainError(f"{where}: strategy '{name}' cannot run sharded: {why}. Strategies that can: {works}; or "
                          "drop train.sharding (a replicated data-parallel run)")
    refused = [
        (config.model_quantization is not None, "model_quantization",
         "quantized weights (bitsandbytes) cannot be split into FSDP's shards"),
        (config.analysis.enabled, "analysis.enabled", "the update analysis reads whole weights at every measurement"),
    ]
    for bad, key, why in refused:
        if bad:
            raise RetainError(f"{where}: {key} is not available in a sharded run ({why}); drop one of them")


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapper: FSDP's root must be the module whose
    forward ``generate`` calls, or generation would run on unsharded-looking shards."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def shard(model: nn.Module, mode: str) -> nn.Module:
    """Shard ``model`` in place: each decoder layer its own group, the rest (embeddings, the
    tied head, the final norm) the root's. Gradients are reduce-scattered as plain sums."""
    from torch.distributed.fsdp import fully_shard

    from retain.errors import RetainError

    lm = causal_lm(model)
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise RetainError(f"train.sharding: {type(lm).__name__} has no model.layers to shard by decoder layer")
    if not dist.is_initialized():
        # One process (the sharded path checked on one GPU, or a config written for N run on
        # one): a group of one, in which each shard is the whole weight.
        device = next(model.parameters()).device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        _own_group.append(True)
    reshard = mode == "zero3"
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(lm, reshard_after_forward=reshard)
    for module in fsdp_modules(model):
        # The loop divides token losses by the global count, so the shares' gradients add
        # up; a plain SUM also keeps gloo (no PREMUL_SUM) usable.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP manages (the model's decoder layers and root), none when unsharded."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in causal_lm(model).modules() if isinstance(m, FSDPModule)]


def release() -> None:
    """End the group of one that ``shard`` made, if it made one (a launcher's group is its own)."""
    if _own_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_group.clear()


def reshard(model: nn.Module) -> None:
    """Put every gathered weight back into its shards (no-op for a model that is not sharded)."""
    for module in fsdp_modules(model):
        module.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(causal_lm(model), FSDPModule)


def full(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with every shard gathered into its full tensor. A collective: every process
    calls it with the same keys in the same order."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor every process holds) cut to this process's shard of
    ``reference``; no communication. Anything else is returned as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor) or isinstance(value, DTensor) or value.shape != reference.shape:
        return value
    return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                             reference.placements, src_data_rank=None)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard, or ``t`` itself when it is not sharded."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shaped_like(reference: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``part`` (this process's shard) as a sharded tensor placed like ``reference``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(reference, DTensor):
        return part
    return DTensor.from_local(part, reference.device_mesh, reference.placements, shape=reference.shape,
                              stride=reference.stride())


def fit(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from a checkpoint, each cut to this process's shard of the weight its key
    names: a weight's own name, or ``.../<weight name>`` (a strategy's per-weight tensors,
    EWC's Fisher and anchors). Unchanged for a model that is not sharded."""
    current = model.state_dict()
    weight = {k: k.rsplit("/", 1)[-1] for k in tensors}  # weight names hold dots, never slashes
    return {k: like(current[weight[k]], v) if weight[k] in current else v for k, v in tensors.items()}


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict()`` with its sharded moments gathered (a collective)."""
    return {**state, "state": {i: full(s) for i, s in state["state"].items()}}


def fit_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state cut to the shards of the parameters it belongs to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fitted = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        fitted[i] = {k: like(p, v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    return {**state, "state": fitted}


def gather_for_export(model: nn.Module) -> None:
    """Replace every shard by its full weight for good, on every process (a collective), so
    adapters and merged weights are written from whole tensors by the code that writes them
    for any run. The model runs no forward after this (FSDP's hooks would find no shards)."""
    from torch.distributed.tensor import DTensor

    whole: dict[int, nn.Parameter] = {}
    # remove_duplicate=False: a tied weight (embeddings and head) is one tensor under two names.
    for name, param in model.named_parameters(remove_duplicate=False):
        if not isinstance(param, DTensor):
            continue
        if id(param) not in whole:
            whole[id(param)] = nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = whole[id(param)]
