"""The language-modelling loss of a training batch, with logits only where a target is predicted.

A causal LM's forward pass projects every position onto the whole vocabulary and transformers'
loss then upcasts all of those logits to fp32; when the targets are a few answer tokens after a
prompt of hundreds (a class name, a short answer) nearly all of that is discarded. Passing
``logits_to_keep`` (the columns that predict a labelled token) keeps the loss and its gradients
the same (every other position has label -100 and adds nothing) and skips the rest.

transformers computes the loss only over the logits it returns with the labels of the whole
row, so with a subset of columns the loss is computed here, the way its ``ForCausalLMLoss``
does: fp32 cross-entropy, summed and divided by ``num_items_in_batch`` when given (the
data-parallel step), else the mean over target tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from retain.embeddings import ModelWrapper

IGNORE = -100


def target_columns(labels: torch.Tensor) -> torch.Tensor:
    """Columns whose logits predict a labelled token in at least one row (column c predicts the
    token at c + 1); rows are right-padded, so these are the union of each row's answer span."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()


def lm_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: int | None = None,
               full_logits: bool = False) -> Any:
    """The model's outputs on ``batch``; ``.loss`` is the token loss on its labels, averaged over
    them or, given ``num_items``, summed and divided by it.

    ``full_logits``: every position's logits (for strategies that read them). Otherwise
    ``.logits`` holds only the columns of ``target_columns``, except for wrappers that rewrite
    the input (soft prompts, routing), whose positions are not the batch's columns."""
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    labels = batch["labels"]
    columns = target_columns(labels)
    if full_logits or isinstance(model, ModelWrapper) or not len(columns):
        return model(**batch, **extra)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=columns)
    logits = outputs.logits
    targets = labels[:, columns + 1]
    summed = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=IGNORE, reduction="sum")
    count = num_items if num_items is not None else int((targets != IGNORE).sum())
    outputs.loss = summed / count
    return outputs
