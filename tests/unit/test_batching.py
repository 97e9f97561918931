"""Length-grouped batches (``train.group_by_length``): the same examples, less padding,
unchanged per-example losses, refused where batch order is not retain's to choose."""

from __future__ import annotations

import random
from itertools import islice

import pytest
import torch

from retain.batching import MEGABATCH, batch_stream, collate, token_lengths
from retain.config import load_config
from retain.errors import RetainError
from retain.streams.task import Item


def items_of(lengths: list[int]) -> list[Item]:
    return [Item("t", f"p{i} " + "w " * n, "x") for i, n in enumerate(lengths)]


def test_without_lengths_the_batches_are_the_plain_shuffle():
    items = items_of(list(range(23)))
    rng, ref = random.Random(3), random.Random(3)
    got = list(islice(batch_stream(items, 4, rng), 10))
    expected = []
    while len(expected) < 10:  # the draw as written before grouping existed
        order = items[:]
        ref.shuffle(order)
        expected += [order[b * 4:(b + 1) * 4] for b in range(len(order) // 4)]
    assert got == expected[:10]


def test_grouped_epochs_visit_the_same_examples_with_less_padding():
    gen = random.Random(0)
    lengths = [gen.randint(1, 200) for _ in range(2 * 4 * MEGABATCH + 9)]
    items = items_of(lengths)
    per_epoch = len(items) // 4

    def epochs(grouped: bool) -> list[list[list[int]]]:
        stream = batch_stream(list(range(len(items))), 4, random.Random(7), lengths if grouped else None)
        return [list(islice(stream, per_epoch)) for _ in range(2)]

    plain, grouped = epochs(False), epochs(True)
    # The first epoch holds the plain shuffle's examples (its full batches), regrouped; every
    # epoch visits distinct examples in full batches.
    assert sorted(i for b in grouped[0] for i in b) == sorted(i for b in plain[0] for i in b)
    for epoch in grouped:
        flat = [i for b in epoch for i in b]
        assert len(flat) == len(set(flat)) == per_epoch * 4 and all(len(b) == 4 for b in epoch)
    waste = lambda epoch: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)  # noqa: E731
                              for b in epoch)
    assert waste(grouped[0]) < 0.2 * waste(plain[0])
    # The batches come in a random order, not longest first.
    widths = [max(lengths[i] for i in b) for b in grouped[0]]
    assert widths != sorted(widths, reverse=True) and widths != sorted(widths)
    assert grouped[0] != grouped[1]


def test_each_example_loses_the_same_in_a_grouped_batch_as_alone():
    from retain.models import load_model

    model, tok = load_model("tiny-random")
    model.eval()
    items = [Item("t", "upper cat and a much longer prompt here", "CAT"), Item("t", "upper sun", "SUN"),
             Item("t", "upper a b c d e f", "ABCDEF")]
    assert len(set(token_lengths(tok, items, 64))) == 3

    def per_example(batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return nll.sum(1) / (labels != -100).sum(1)

    with torch.no_grad():
        together = per_example(collate(tok, items, 64))
        alone = torch.cat([per_example(collate(tok, [it], 64)) for it in items])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("extra,fragment", [
    (dict(online={"eval_every": 4}), "online mode trains the stream in its arrival order"),
    (dict(privacy={"noise_multiplier": 1.0}), "DP-SGD draws each batch by Poisson sampling"),
])
def test_grouping_is_refused_where_the_batch_order_is_not_retains(tiny_config, extra, fragment):
    with pytest.raises(RetainError, match=f"train.group_by_length: {fragment}"):
        load_config(tiny_config("g", strategy="lora", train__group_by_length=True, **extra))


def test_a_grouped_run_killed_inside_a_task_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    import retain.loop as loop
    from retain.loop import execute
    from tests.conftest import die_at, run_figures

    over = dict(strategy="lora", train__group_by_length=True, train__max_steps=4, train__checkpoint_every=2)
    full = execute(load_config(tiny_config("full", **over)), quiet=True)
    die_at(monkeypatch, loop.Run, "gradient_step", 7)  # inside task two, after its step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        execute(load_config(tiny_config("killed", **over)), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "killed"
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert run_figures(resumed) == run_figures(full)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    from retain.loop import prepare
    from retain.ui import UI

    grads = {}
    for on in (False, True):
        cfg = load_config(tiny_config(f"gc{on}", strategy="lora", lora={"r": 4, "dropout": 0.0},
                                      train__gradient_checkpointing=on))
        ctx, _ = prepare(cfg, UI(quiet=True))
        hf = next(m for m in ctx.model.modules() if hasattr(m, "is_gradient_checkpointing"))
        assert hf.is_gradient_checkpointing == on
        items = ctx.stream.tasks[0].items(ctx.tokenizer)[:4]
        ctx.model.train()
        ctx.model(**collate(ctx.tokenizer, items, 64)).loss.backward()
        grads[on] = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-6) for n in grads[True])


def test_gradient_checkpointing_is_refused_where_the_loop_does_not_step(tiny_config):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=r"train.gradient_checkpointing: strategy 'naive\+es' replaces the loop's "
                                          "training step"):
        check_run(load_config(tiny_config("es", strategy="es", train__gradient_checkpointing=True)))
