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
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
            weights = mask.to(device).unsqueeze(-1).float()
            rows.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    return F.normalize(torch.cat(rows), dim=1)
