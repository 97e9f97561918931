"""Each strategy's contract on a tiny model: what trains, what stays bit-equal, what is kept."""

import random

import torch

from retain.config import load_config
from retain.batching import batch_stream
from retain.loop import Run, prepare
from retain.strategies.replay import Replay, ReplayOptions
from retain.streams.task import Item
from retain.ui import UI


def _setup(path, tmp_path):
    cfg = load_config(path)
    ctx, stack = prepare(cfg, UI(quiet=True))
    ctx.run_dir = tmp_path / "run"
    return cfg, ctx, stack, Run(cfg, ctx.run_dir, UI(quiet=True))


def _snapshot(model, predicate=lambda n: True):
    return {n: p.detach().clone() for n, p in model.named_parameters() if predicate(n)}


def test_naive_trains_every_weight(tiny_config, tmp_path):
    _, ctx, stack, run = _setup(tiny_config(), tmp_path)
    before = _snapshot(ctx.model)
    run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    changed = [n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_lora_freezes_base_and_trains_adapter(tiny_config, tmp_path):
    _, ctx, stack, run = _setup(tiny_config(strategy="lora"), tmp_path)
    base = _snapshot(ctx.model, lambda n: "lora_" not in n)
    lora = _snapshot(ctx.model, lambda n: "lora_B" in n)
    run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    assert lora and all(not torch.equal(after[n], t) for n, t in lora.items())


def test_lora_per_task_isolates_adapters(tiny_config, tmp_path):
    _, ctx, stack, run = _setup(tiny_config(strategy="lora-per-task"), tmp_path)
    first, second = ctx.stream.tasks
    run.train_phase(ctx, stack, [first], 0)
    adapter1 = _snapshot(ctx.model, lambda n: f".{first.name}." in n)
    base = _snapshot(ctx.model, lambda n: "lora_" not in n)
    assert adapter1
    run.train_phase(ctx, stack, [second], 1)
    after = dict(ctx.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in adapter1.items())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    adapter2 = [n for n in after if f"lora_B.{second.name}." in n]
    assert adapter2 and any(after[n].abs().sum() > 0 for n in adapter2)
    saved = ctx.run_dir / "adapters" / first.name
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()


def test_lora_per_task_routes_each_task_to_its_adapter(tiny_config, tmp_path):
    _, ctx, stack, run = _setup(tiny_config(strategy="lora-per-task"), tmp_path)
    first, second = ctx.stream.tasks
    run.train_phase(ctx, stack, [first], 0)
    with stack.route(ctx, first.name):
        assert ctx.model.active_adapter == first.name
    with stack.route(ctx, second.name):  # not trained yet: the base model
        ids = torch.tensor([[1, 2, 3]], device=ctx.model.device)
        routed = ctx.model(input_ids=ids).logits
    with ctx.model.disable_adapter():
        plain = ctx.model(input_ids=ids).logits
    assert torch.equal(routed, plain)


def test_joint_is_one_phase_with_the_steps_of_all_tasks(tiny_config, tmp_path):
    _, ctx, stack, run = _setup(tiny_config(strategy="joint"), tmp_path)
    phases = stack.plan(ctx.stream.tasks)
    assert len(phases) == 1 and phases[0] == ctx.stream.tasks
    timing = run.train_phase(ctx, stack, phases[0], 0)
    assert timing["steps"] == 2 * 3


def test_reservoir_keeps_a_uniform_sample_of_bounded_size():
    replay = Replay(ReplayOptions(buffer_size=50, ratio=0.5))
    replay.memory.rng = random.Random(1)
    for i in range(1000):
        replay.add(Item("t", str(i), "x"))
    assert len(replay.buffer) == 50 and replay.memory.seen == 1000
    values = [int(i.prompt) for i in replay.buffer]
    assert len(set(values)) == 50
    assert 300 < sum(values) / 50 < 700  # a uniform sample of 0..999 has mean ~500


def test_replay_mixes_memory_into_batches_and_round_trips_state(tiny_config, tmp_path):
    replay = Replay(ReplayOptions(buffer_size=4, ratio=0.5))
    old = [Item("old", f"o{i}", "x") for i in range(4)]
    for item in old:
        replay.add(item)
    new = [Item("new", f"n{i}", "y") for i in range(8)]
    batches = list(replay.batches(None, [], iter([new[:4], new[4:]])))
    assert all(sum(i.task == "old" for i in b) == 2 and len(b) == 4 for b in batches)
    replay.after_task(None, [])
    assert replay.memory.seen == 4 + 4  # only fresh examples actually trained on enter memory
    copy = Replay(ReplayOptions(buffer_size=4, ratio=0.5))
    copy.load_state_dict(None, replay.state_dict())
    assert copy.buffer == replay.buffer and copy.memory.rng.random() == replay.memory.rng.random()


def test_batch_stream_cycles_even_when_the_task_is_smaller_than_a_batch():
    items = [Item("t", str(i), "x") for i in range(3)]
    stream = batch_stream(items, 8, random.Random(0))
    assert [len(next(stream)) for _ in range(3)] == [3, 3, 3]


def test_no_optimizer_is_built_for_a_phase_a_strategy_takes_over(tiny_config, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an optimizer was built for an ES phase")

    _, ctx, stack, run = _setup(tiny_config(strategy="es", es={"population": 2, "max_new_tokens": 2}), tmp_path)
    monkeypatch.setattr(torch.optim, "AdamW", refuse)
    timing = run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    assert timing["steps"] == 3


def test_the_loop_trains_exactly_what_trainable_parameters_returns(tiny_config, tmp_path):
    from retain.strategies import Strategy

    class FirstOnly(Strategy):
        """Returns one tensor while every weight requires grad: only that one may move."""
        name = "first-only"

        def trainable_parameters(self, ctx):
            return [next(ctx.model.parameters())]

    _, ctx, stack, run = _setup(tiny_config(), tmp_path)
    stack.strategies.insert(0, FirstOnly())
    before = _snapshot(ctx.model)
    run.train_phase(ctx, stack, [ctx.stream.tasks[0]], 0)
    changed = [n for n, p in ctx.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [next(iter(before))]
