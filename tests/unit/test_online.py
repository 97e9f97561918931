"""Task-free online learning on tiny-random: the schedule, hidden identity, anytime evaluation,
MIR against a brute-force computation, refusals, and a kill inside the online pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from retain.config import load_config
from retain.errors import RetainError
from retain.loop import execute
from retain.streams.online import hidden_boundaries, online_batches, schedule
from retain.streams.task import Item

SIZES = [40, 60, 50]


def test_sharp_schedule_is_the_tasks_in_order_each_example_once():
    order = schedule(SIZES, "sharp", seed=3)
    assert sorted(order) == [(t, i) for t, n in enumerate(SIZES) for i in range(n)]
    assert [t for t, _ in order] == [0] * 40 + [1] * 60 + [2] * 50
    assert order != schedule(SIZES, "sharp", seed=4) and order == schedule(SIZES, "sharp", seed=3)
    assert hidden_boundaries(SIZES) == [40, 100, 150]


def test_blurry_schedule_mixes_neighbours_near_the_boundaries_only():
    assert schedule(SIZES, "blurry", blur=0.0, seed=1) == schedule(SIZES, "sharp", seed=1)
    order = schedule(SIZES, "blurry", blur=0.1, seed=1)
    assert sorted(order) == [(t, i) for t, n in enumerate(SIZES) for i in range(n)]  # each example once
    tasks = [t for t, _ in order]
    starts = [0, 40, 100, 150]
    # Far from a boundary (4 standard deviations of a task's length) nothing mixes; near one, something does.
    assert all(t == 1 for t in tasks[40 + 24:100 - 24])
    assert set(tasks[30:50]) == {0, 1} and set(tasks[90:110]) == {1, 2}
    # No example strays to a task two away.
    assert all(abs(t - next(k for k in range(3) if starts[k] <= pos < starts[k + 1])) <= 1
               for pos, t in enumerate(tasks))


def test_online_batches_hide_the_task_and_repeat_a_batch_per_pass():
    items = [[Item(f"t{t}", f"p{t}-{i}", "x") for i in range(n)] for t, n in enumerate([3, 2])]
    order = schedule([3, 2], "sharp", seed=0)
    batches = list(online_batches(order, items, batch_size=2, passes=2, label="stream"))
    assert len(batches) == 6 and batches[0] is batches[1] and batches[2] is batches[3]
    assert {it.task for b in batches for it in b} == {"stream"}
    flat = [it.prompt for b in batches[::2] for it in b]
    assert flat == [f"p{t}-{i}" for t, i in order]
    visible = list(online_batches(order, items, 2, 1, label=None))
    assert {it.task for b in visible for it in b} == {"t0", "t1"}


def online_config(tiny_config, name="o", **kw):
    base = dict(strategy="lora+replay", online={"eval_every": 4}, train__batch_size=4, lora={"r": 4},
                replay={"buffer_size": 8, "ratio": 0.5}, eval__probe=False)
    base.update(kw)
    return load_config(tiny_config(name, **base))


def test_online_run_records_the_curve_boundaries_and_prequential_scores(tiny_config, tmp_path):
    results = execute(online_config(tiny_config), quiet=True)
    o = results["online"]
    assert o["boundaries"] == [16, 26] and o["examples"] == 26  # the fixture's 16 + 10 training examples
    assert [c["examples"] for c in o["curve"]] == [4, 8, 12, 16, 20, 24, 26]
    # R holds the evaluations at the hidden boundaries, one row per task, as a stream with boundaries.
    assert results["phases"] == [["upper"], ["small"]] and len(results["R"]) == 2
    assert results["R"][0] == [round(v, 4) for v in o["curve"][3]["scores"]]
    assert results["timings"][0]["steps"] == 7  # ceil(26 / 4) incoming batches, one pass each
    # Mean over seen tasks: only 'upper' arrives before example 16 (sharp order).
    for c in o["curve"]:
        seen = [0] if c["examples"] <= 16 else [0, 1]
        assert c["seen_mean"] == pytest.approx(sum(c["scores"][j] for j in seen) / len(seen), abs=1e-3)
    assert o["AAA"] == pytest.approx(sum(c["seen_mean"] for c in o["curve"]) / len(o["curve"]), abs=1e-3)
    assert results["metrics"]["AAA"] == o["AAA"]
    # Every incoming example scored once before it trained.
    assert sum(len(v) for p in o["prequential"] for v in p["scores"].values()) == 26
    assert (tmp_path / "runs" / "o" / "plots" / "online.png").is_file()
    assert "## Online (task-free) learning" in (tmp_path / "runs" / "o" / "report.md").read_text()


def test_strategies_see_no_task_identity_unless_allowed(tiny_config, tmp_path):
    from retain.loop import restore

    execute(online_config(tiny_config, "hidden"), quiet=True)
    _, stack = restore(tmp_path / "runs" / "hidden")
    replay = next(s for s in stack.strategies if s.name == "replay")
    assert replay.buffer and {it.task for it in replay.buffer} == {"stream"}
    execute(online_config(tiny_config, "labels", online={"eval_every": 4, "task_labels": True}), quiet=True)
    _, stack = restore(tmp_path / "runs" / "labels")
    replay = next(s for s in stack.strategies if s.name == "replay")
    assert {it.task for it in replay.buffer} <= {"upper", "small"}


@pytest.mark.parametrize("strategy,fragment", [
    ("ewc", "strategy 'ewc' needs task boundaries (it consolidates the weights at each task's end)"),
    ("lora-per-task", "strategy 'lora-per-task' needs task boundaries (it keys its state by each phase's task)"),
    ("lwf", "strategy 'lwf' needs task boundaries (it snapshots the model as a teacher at each task's start)"),
    ("joint+lora", "strategy 'joint' needs task boundaries"),
])
def test_strategies_that_need_boundaries_are_refused(tiny_config, strategy, fragment):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=r"online: " + fragment.replace("(", r"\(").replace(")", r"\)")):
        check_run(online_config(tiny_config, strategy=strategy))
    with pytest.raises(RetainError, match="needs replay.policy reservoir"):
        check_run(online_config(tiny_config, replay={"policy": "coreset", "buffer_size": 8}))


def killed_at_sixth_step(tiny_config, tmp_path, monkeypatch, over: dict, at: int = 6):
    """An online run killed at its sixth (or ``at``-th) gradient step: its folder and the checkpoint it left."""
    import retain.loop as loop
    from tests.conftest import die_at

    die_at(monkeypatch, loop.Run, "gradient_step", at)
    with pytest.raises(KeyboardInterrupt):
        execute(online_config(tiny_config, "killed", **over), quiet=True)
    monkeypatch.undo()
    run_dir = tmp_path / "runs" / "killed"
    return run_dir, json.loads((run_dir / "checkpoints" / "state.json").read_text())


def test_online_run_killed_inside_the_pass_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    import retain.loop as loop

    over = dict(train__checkpoint_every=2)
    full = execute(online_config(tiny_config, "full", **over), quiet=True)
    run_dir, state = killed_at_sixth_step(tiny_config, tmp_path, monkeypatch, over)
    assert len(state["progress"]["losses"]) == 4 and len(state["online"]["curve"]) == 4
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert resumed["R"] == full["R"] and resumed["online"]["curve"] == full["online"]["curve"]
    assert resumed["online"]["prequential"] == full["online"]["prequential"]


def test_mir_killed_inside_the_pass_resumes_exactly_without_redoing_its_virtual_steps(tiny_config, tmp_path,
                                                                                     monkeypatch):
    """Fast-forwarding to the checkpoint draws MIR's candidates (its RNG stays in step) but runs no
    virtual step: those cost as much as real steps, and the batches they pick never train."""
    import retain.loop as loop
    import retain.strategies.mir as mir

    over = dict(strategy="lora+mir", mir={"buffer_size": 8, "candidates": 4, "retrieve": 2},
                train__checkpoint_every=2)
    full = execute(online_config(tiny_config, "full", **over), quiet=True)
    run_dir, state = killed_at_sixth_step(tiny_config, tmp_path, monkeypatch, over)
    assert len(state["progress"]["losses"]) == 4
    calls = []
    real = mir.interference
    monkeypatch.setattr(mir, "interference", lambda *args: calls.append(1) or real(*args))
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    steps = resumed["timings"][0]["steps"]
    assert len(calls) == steps - 4  # only the steps after the checkpoint's fourth
    assert resumed["R"] == full["R"] and resumed["online"]["curve"] == full["online"]["curve"]
    assert resumed["online"]["prequential"] == full["online"]["prequential"]
    assert resumed["strategy_stats"] == full["strategy_stats"]


def test_mir_retrieves_the_candidates_a_virtual_step_hurts_most(tiny_config):
    """Against brute force: each candidate's loss before and after the same SGD step on a copy."""
    from types import SimpleNamespace

    from retain.models import load_model
    from retain.strategies.mir import MIR, MIROptions, example_losses

    model, tok = load_model("tiny-random", seed=0)
    model.train()
    cfg = SimpleNamespace(eval=SimpleNamespace(batch_size=8), train=SimpleNamespace(max_length=64, lr=0.5),
                          seed=0, online=None)
    ctx = SimpleNamespace(model=model, tokenizer=tok, config=cfg, fast_forward=False)
    batch = [Item("a", f"upper {w}", w.upper()) for w in ("cat", "dog", "sun", "sky")]
    memory = [Item("b", f"is {i} small?", "yes" if i < 5 else "no") for i in range(6)] + \
             [Item("a", f"upper {w}", w.upper()) for w in ("red", "map", "pen", "cup")]
    mir = MIR(MIROptions(buffer_size=20, candidates=10, retrieve=3))
    mir.setup(ctx)
    for item in memory:
        mir.memory.offer(item)
    state = copy.deepcopy(model.state_dict())
    picked = mir.select(ctx, batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the virtual step left no trace
    assert model.training

    # Brute force, one candidate at a time, on a copy that takes the step for real.
    from retain.batching import collate

    stepped = copy.deepcopy(model).eval()
    inputs = collate(tok, batch, 64)
    loss = stepped(**inputs).loss
    loss.backward()
    with torch.no_grad():
        for p in stepped.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    rise = {}
    for item in memory:
        before = example_losses(ctx, [item])[0]
        after = example_losses(SimpleNamespace(model=stepped, tokenizer=tok, config=cfg), [item])[0]
        rise[(item.prompt, item.target)] = float(after - before)
    top = sorted(rise, key=rise.get, reverse=True)[:3]
    assert [(i.prompt, i.target) for i in picked] == top
    assert len({round(v, 5) for v in rise.values()}) == len(rise)  # a ranking with no ties: the test can fail


def test_plateau_detector_finds_plateaus_and_the_shift_between_them():
    from retain.strategies._plateau import PlateauDetector

    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.02, 0.98, 1.0, 4.0, 4.2, 4.1, 3.0, 2.0, 1.0, 0.5, 0.5, 0.52, 0.5, 0.5]
    detector = PlateauDetector(window=4, plateau_cv=0.1, peak_ratio=1.5)
    events = {i + 1: e for i, loss in enumerate(losses) if (e := detector.update(loss))}
    # Settled after the 4 steps at ~1.0 (step 8); the jump to ~4 raises the window mean past
    # 1.5x that plateau at step 10; settled again at ~0.5 by step 19.
    assert events == {8: ["plateau"], 10: ["shift"], 19: ["plateau"]}
    copy = PlateauDetector(4, 0.1, 1.5)
    copy.load(json.loads(json.dumps(detector.state())))
    assert copy.update(3.0) == detector.update(3.0)


TF = dict(strategy="lora+tf-ewc", tf_ewc={"window": 2, "plateau_cv": 0.5, "peak_ratio": 1.01, "recent": 8,
                                           "fisher_samples": 3, "lambda": 10}, train__lr=0.05)


def test_tf_ewc_consolidates_at_plateaus_and_reports_shifts_in_examples(tiny_config):
    results = execute(online_config(tiny_config, "tf", **TF), quiet=True)
    stats = results["strategy_stats"][-1]["tf-ewc"]
    assert stats["consolidations"] >= 1 and stats["plateaus_at_step"][0] >= 2
    assert results["online"]["shifts"] == [min(s * 4, 26) for s in stats["shifts_at_step"]]


def test_tf_ewc_killed_after_a_consolidation_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    import retain.loop as loop

    over = dict(train__checkpoint_every=2, **TF)
    full = execute(online_config(tiny_config, "full", **over), quiet=True)
    assert full["strategy_stats"][-1]["tf-ewc"]["plateaus_at_step"][0] <= 4  # before the kill below
    run_dir, state = killed_at_sixth_step(tiny_config, tmp_path, monkeypatch, over)
    assert state["progress"]["strategy"]["tf-ewc"]["fisher"]  # the Fisher went beside the JSON
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert resumed["R"] == full["R"] and resumed["online"]["curve"] == full["online"]["curve"]
    assert [t["loss_last"] for t in resumed["timings"]] == [t["loss_last"] for t in full["timings"]]
    assert resumed["strategy_stats"] == full["strategy_stats"]


TFL = dict(strategy="tf-lora", tf_lora={"r": 4, "window": 2, "plateau_cv": 0.5, "peak_ratio": 1.005,
                                        "max_adapters": 3, "centroid_samples": 6},
           train__lr=0.3, online={"eval_every": 4, "passes": 2})


def lora_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_tf_lora_opens_an_adapter_at_each_shift_and_freezes_the_one_before(tiny_config, tmp_path, monkeypatch):
    """Adapter k trains only between the shifts that open k and k+1; each input is answered by
    the adapter of its nearest centroid."""
    import retain.strategies.tf_lora as tfl
    from retain.loop import restore

    snapshots: dict[int, dict] = {}
    real = tfl.TaskFreeLora.observe

    def watching(self, ctx, events):
        before = self.active
        real(self, ctx, events)
        if self.active != before:  # the adapter that just closed, as it was at the shift
            snapshots[before] = lora_weights(ctx.model, tfl.segment(before))

    monkeypatch.setattr(tfl.TaskFreeLora, "observe", watching)
    results = execute(online_config(tiny_config, "tfl", **TFL), quiet=True)
    stats = results["strategy_stats"][-1]["tf-lora"]
    assert stats["shifts_at_step"], "the sharp loss jump at the hidden boundary should read as a shift"
    assert stats["adapters"] == min(len(stats["shifts_at_step"]) + 1, 3) == len(snapshots) + 1
    assert stats["adapter_opened_at_step"] == [0] + stats["shifts_at_step"][:2]
    assert results["online"]["shifts"] == [min(-(-s // 2) * 4, 26) for s in stats["shifts_at_step"]]  # 2 passes
    assert stats["centroid_inputs"] == [6] * (stats["adapters"] - 1) + [stats["centroid_inputs"][-1]]

    ctx, stack = restore(tmp_path / "runs" / "tfl")
    for k, frozen in snapshots.items():  # closed adapters ended as they were at their shift
        now = lora_weights(ctx.model, tfl.segment(k))
        assert frozen and all(torch.equal(now[n], frozen[n]) for n in frozen)
        assert any(v.abs().sum() > 0 for n, v in now.items() if "lora_B" in n)  # and did train before it
    untouched = lora_weights(ctx.model, tfl.segment(2)) if stats["adapters"] < 3 else {}
    assert all(float(v.abs().sum()) == 0 for n, v in untouched.items() if "lora_B" in n)

    # Routing: the model (in eval mode) sends each input to its nearest centroid's adapter.
    router = ctx.accelerator.unwrap_model(ctx.model)
    names, centroids = router.centroids()
    prompts = ["upper cat", "is 3 small?"]
    from retain.embeddings import embed_texts

    with router.base.disable_adapter():
        expected = [names[i] for i in (embed_texts(router.base, ctx.tokenizer, prompts) @ centroids.T).argmax(1)]
    enc = ctx.tokenizer(prompts, return_tensors="pt", padding=True)
    router.eval()
    with torch.no_grad():
        routed = router(**enc).logits
        assert router.last_routes == expected
        # A row routed to adapter k scores as the model with only adapter k active.
        for r, name in enumerate(expected):
            router.base.set_adapter(name)
            alone = router.base(input_ids=enc["input_ids"][r:r + 1], attention_mask=enc["attention_mask"][r:r + 1])
            n = int(enc["attention_mask"][r].sum())
            assert torch.allclose(routed[r, -n:] if ctx.tokenizer.padding_side == "left" else routed[r, :n],
                                  alone.logits[0, -n:] if ctx.tokenizer.padding_side == "left" else alone.logits[0, :n],
                                  atol=1e-4)
    saved = json.loads((tmp_path / "runs" / "tfl" / "adapters" / "routing.json").read_text())
    assert saved["adapters"] == names
    assert all((tmp_path / "runs" / "tfl" / "adapters" / n / "adapter_config.json").is_file() for n in names)


def test_tf_lora_killed_after_a_shift_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    import retain.loop as loop

    over = dict(train__checkpoint_every=2, **TFL)
    full = execute(online_config(tiny_config, "full", **over), quiet=True)
    assert full["strategy_stats"][-1]["tf-lora"]["shifts_at_step"][0] <= 11  # seen before the kill below
    run_dir, state = killed_at_sixth_step(tiny_config, tmp_path, monkeypatch, over, at=13)
    assert state["progress"]["strategy"]["tf-lora"]["active"] >= 1
    resumed = execute(loop.load_run_config(run_dir), run_dir=run_dir, resume=True, quiet=True)
    assert resumed["R"] == full["R"] and resumed["online"]["curve"] == full["online"]["curve"]
    assert resumed["strategy_stats"] == full["strategy_stats"]
