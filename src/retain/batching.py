"""Turning rendered items into training batches: shared by the loop and by strategies."""

from __future__ import annotations

import random
from typing import Iterator

import torch

from retain.evaluation.scoring import encode_pair
from retain.streams.task import Item


def collate(tokenizer, items: list[Item], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels only on the target tokens (prompt, padding and items
    with ``lm_loss=False`` are -100)."""
    rows = []
    for item in items:
        ids, n_target = encode_pair(tokenizer, item.prompt, item.target + tokenizer.eos_token, max_length)
        rows.append((ids, n_target))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, ((ids, n), item) in enumerate(zip(rows, items)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        if item.lm_loss:
            labels[r, len(ids) - n : len(ids)] = torch.tensor(ids[len(ids) - n :])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


#: Length grouping sorts groups of this many batches, as transformers' ``LengthGroupedSampler``
#: does: enough examples to find similar lengths, few enough that batches stay a random draw.
MEGABATCH = 50


def batch_stream(items: list[Item], batch_size: int, rng: random.Random,
                 lengths: list[int] | None = None) -> Iterator[list[Item]]:
    """Endless shuffled epochs over ``items``; with ``lengths`` (tokens per item), each epoch's
    batches hold examples of similar length (``train.group_by_length``)."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        # Full batches only (the remainder is reshuffled into the next epoch).
        n = max(len(order) // batch_size, 1)
        batches = [order[b * batch_size : (b + 1) * batch_size] for b in range(n)]
        if lengths is not None:
            batches = length_grouped(batches, lengths, batch_size, rng)
        for batch in batches:
            yield [items[i] for i in batch]


def length_grouped(batches: list[list[int]], lengths: list[int], batch_size: int,
                   rng: random.Random) -> list[list[int]]:
    """The same examples re-batched: within each group of ``MEGABATCH`` batches, sorted by
    length and cut into batches again; then the batches in a random order."""
    flat = [i for batch in batches for i in batch]
    span = batch_size * MEGABATCH
    out = []
    for start in range(0, len(flat), span):
        group = sorted(flat[start:start + span], key=lambda i: lengths[i], reverse=True)
        out += [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


def token_lengths(tokenizer, items: list[Item], max_length: int) -> list[int]:
    """Each item's training length in tokens (prompt, target and end of sequence, truncated as ``collate`` does)."""
    return [len(encode_pair(tokenizer, item.prompt, item.target + tokenizer.eos_token, max_length)[0])
            for item in items]


def target_mask(tokenizer, items: list[Item], max_length: int) -> torch.Tensor:
    """Bool mask of the target positions of each row, whatever ``lm_loss`` says."""
    batch = collate(tokenizer, [Item(i.task, i.prompt, i.target) for i in items], max_length)
    return batch["labels"] != -100
