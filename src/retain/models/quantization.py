"""QLoRA: ``model_quantization: nf4 | int8`` loads the frozen base through bitsandbytes.

Only LoRA adapters train on top of a quantized base (the 4- and 8-bit weights cannot take a
gradient step), so the stack's parameter owner must be a PEFT LoRA method. bitsandbytes'
k-bit layers run on CUDA GPUs; elsewhere the run is refused before the model loads.
"""

from __future__ import annotations

import importlib.util

import torch

from retain.errors import RetainError

#: Strategies whose trainable parameters are PEFT LoRA adapters on a frozen base.
LORA_OWNERS = {"lora", "lora-per-task", "olora"}
#: Strategies that run the phase or the step themselves; not run on k-bit layers.
UNSUPPORTED = {"es": "es perturbs and restores weights in place, which bitsandbytes' packed weights do not allow "
                     "for the base and which has not been checked for adapters on a k-bit base",
               "grpo": "grpo trains through TRL's trainer, which retain does not hand a k-bit model"}


def check(config, stack) -> None:
    """Refuse a quantized run this machine or this strategy cannot do, naming why."""
    kind = config.model_quantization
    if kind is None:
        return
    names = [s.name for s in stack.strategies]
    owners = [s.name for s in stack.strategies if s.owns_parameters]
    if not owners or not set(owners) <= LORA_OWNERS:
        raise RetainError(f"model_quantization: {kind} trains LoRA adapters on a frozen quantized base; strategy "
                          f"'{stack.name}' trains {'its own parameters' if owners else 'the base weights'} "
                          f"({', '.join(owners) or 'no adapter owner'}); use one of "
                          f"{', '.join(sorted(LORA_OWNERS))}")
    for name in names:
        if name in UNSUPPORTED:
            raise RetainError(f"model_quantization: {kind} with strategy '{name}': {UNSUPPORTED[name]}")
    if config.model == "tiny-random":
        raise RetainError("model_quantization: tiny-random is built in memory; quantize a saved model folder")
    if config.train.device == "cpu" or not torch.cuda.is_available():
        raise RetainError(f"model_quantization: {kind} needs a CUDA GPU (bitsandbytes' k-bit layers); torch sees "
                          "none here. Drop model_quantization to train LoRA on the full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RetainError(f"model_quantization: {kind} needs bitsandbytes: pip install 'retain[qlora]'")


def bnb_config(kind: str):
    """NF4 with double quantization and bf16 compute (the QLoRA recipe), or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_for_training(model):
    """PEFT's k-bit preparation: norms in float32, inputs that carry gradients to the adapters."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
