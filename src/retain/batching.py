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


def batch_stream(items: list[Item], batch_size: int, rng: random.Random) -> Iterator[list[Item]]:
    """Endless shuffled epochs over ``items``."""
    while True:
        order = items[:]
        rng.shuffle(order)
        # Full batches only (the remainder is reshuffled into the next epoch).
        for b in range(max(len(order) // batch_size, 1)):
            yield order[b * batch_size : (b + 1) * batch_size]


def target_mask(tokenizer, items: list[Item], max_length: int) -> torch.Tensor:
    """Bool mask of the target positions of each row, whatever ``lm_loss`` says."""
    batch = collate(tokenizer, [Item(i.task, i.prompt, i.target) for i in items], max_length)
    return batch["labels"] != -100
