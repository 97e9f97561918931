"""Sentence embeddings from the model itself: mean-pooled last hidden states.

Coreset replay and task routing need a vector per text. A separate sentence encoder would
have to come from a model hub, which these machines cannot reach; the model being
trained already encodes its inputs, and for adapter methods its base is frozen, so the
embeddings of a task do not drift while later tasks train.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from retain.evaluation.scoring import eval_mode, left_pad


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """An L2-normalized float32 vector per text (CPU tensor, one row per text, in order)."""
    if not texts:
        raise ValueError("embed_texts needs at least one text")
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] or [tokenizer.eos_token_id]
                       for t in texts[start:start + batch_size]]
            ids, mask = left_pad(encoded, tokenizer.pad_token_id)
            rows.append(pooled_query(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(rows)


@torch.no_grad()
def pooled_query(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor | None = None, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same embedding for a batch already tokenized: L2-normalized mean of the last hidden
    states over the input's tokens: attended, not answer tokens when labels are given (a
    training example) and not the continuation a scorer appended (``query_mask`` 0), so
    training, scoring and generation all query by the prompt alone."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    use = attention_mask.bool()
    if labels is not None:
        use = use & (labels == -100)
    if query_mask is not None:
        use = use & query_mask.bool()
    w = use.unsqueeze(-1).to(hidden.dtype)
    return F.normalize(((hidden * w).sum(1) / w.sum(1).clamp(min=1)).float(), dim=-1)


class ModelWrapper(torch.nn.Module):
    """A module around a transformers model whose other attributes (config,
    generation_config, ...) read through to it, so the loop and scorers can use either.

    Its ``forward`` takes ``query_mask`` (1 on the prompt, 0 on an appended continuation):
    a scorer that appends each answer option to the prompt passes it, so a wrapper that
    routes by its input (prompt selection, expert or adapter routing) routes every option
    of an item the same way, by the prompt, as it does in training and generation."""

    #: Positions the wrapper adds in front of every input (soft prompts): scoring leaves room for them.
    added_positions: int = 0

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.base = model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)
