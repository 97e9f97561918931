"""Shared-prefix choice scoring equals scoring every option as a whole sequence; acc_norm,
standard errors, option labels and capped samples against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch

from retain.evaluation.scoring import (binomial_stderr, choice_logliks, continuation_logprobs, evaluate_task, pick,
                                       shared_prefix_logliks)
from retain.models import load_model
from retain.streams.sampling import seeded_sample
from retain.streams.task import Example, Task

WORDS = ["yes", "no", "maybe so", "absolutely not at all", "x"]


def _task(n: int = 24, seed: int = 0, prefix: str | None = None, options=WORDS) -> Task:
    rng = random.Random(seed)
    exs = [Example(f"question {i} " + "blah " * rng.randint(0, 12), rng.choice(options), tuple(options))
           for i in range(n)]
    return Task("t", [], exs, metric="choice", template="{input}\nAnswer:", answer_prefix=prefix)


def _full_sequence(model, tok, task: Task) -> list[list[float]]:
    pairs = [(task.prompt(tok, ex), task.target(o)) for ex in task.test for o in ex.options]
    flat = iter(lp for lp, _ in continuation_logprobs(model, tok, pairs, 32))
    return [[next(flat) for _ in ex.options] for ex in task.test]


def _assert_same(new: list[list[float]], old: list[list[float]]) -> None:
    for a, b in zip(new, old):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        assert pick(a, WORDS) == pick(b, WORDS)


@pytest.mark.parametrize("batch_size", [1, 5, 32])
def test_shared_prefix_equals_full_sequences(batch_size):
    model, tok = load_model("tiny-random")
    task = _task()
    _assert_same(choice_logliks(model, tok, task, task.test, batch_size), _full_sequence(model, tok, task))


def test_single_token_options_take_one_forward_per_prompt():
    model, tok = load_model("tiny-random")
    task = _task(options=["a", "b", "c"], prefix="")
    assert all(len(tok(o, add_special_tokens=False)["input_ids"]) == 1 for o in "abc")
    calls = []
    handle = model.register_forward_hook(lambda m, a, kw, out: calls.append(1), with_kwargs=True)
    new = choice_logliks(model, tok, task, task.test, batch_size=8)
    handle.remove()
    assert len(calls) == math.ceil(len(task.test) / 8)
    old = _full_sequence(model, tok, task)
    assert all(max(abs(x - y) for x, y in zip(a, b)) < 1e-4 for a, b in zip(new, old))


def test_shared_prefix_scores_through_adapters_and_routing(tiny_config, tmp_path):
    """Per-task LoRA adapters and bottleneck adapters, each routed by task: same scores."""
    from retain.config import load_config
    from retain.loop import Run, prepare
    from retain.ui import UI

    for strategy in ("lora-per-task", "adapter-per-task"):
        cfg = load_config(tiny_config(strategy, strategy=strategy, train__lr=0.05))
        ctx, stack = prepare(cfg, UI(quiet=True))
        run = Run(cfg, tmp_path / strategy, UI(quiet=True))
        run.train_phase(ctx, stack, [ctx.stream.tasks[1]], 0)
        task = ctx.stream.tasks[1]
        with stack.route(ctx, task.name):
            new = choice_logliks(ctx.model, ctx.tokenizer, task, task.test, 4)
            old = _full_sequence(ctx.model, ctx.tokenizer, task)
        assert all(max(abs(x - y) for x, y in zip(a, b)) < 1e-4 for a, b in zip(new, old)), strategy
        with stack.route(ctx, ctx.stream.tasks[0].name):  # not trained: the base model, other scores
            plain = choice_logliks(ctx.model, ctx.tokenizer, task, task.test, 4)
        assert plain != new


def test_wrapped_models_keep_whole_sequence_scoring(tiny_config, tmp_path):
    """l2p's prompt pool rewrites the input: it is scored option by option, as before."""
    from retain.config import load_config
    from retain.loop import prepare
    from retain.ui import UI

    cfg = load_config(tiny_config("l2p", strategy="l2p", l2p={"pool_size": 6, "top_n": 2}))
    ctx, _ = prepare(cfg, UI(quiet=True))
    task = ctx.stream.tasks[1]
    from retain.evaluation import scoring

    assert not scoring.prefix_cache_ok(ctx.model, [[1]])
    new = choice_logliks(ctx.model, ctx.tokenizer, task, task.test, 4)
    assert all(max(abs(x - y) for x, y in zip(a, b)) < 1e-4
               for a, b in zip(new, _full_sequence(ctx.model, ctx.tokenizer, task)))


def test_empty_option_scores_zero_as_before():
    model, tok = load_model("tiny-random")
    prompts = [tok("hello", add_special_tokens=True)["input_ids"]]
    out = shared_prefix_logliks(model, prompts, [[[], tok(" a", add_special_tokens=False)["input_ids"]]],
                                tok.pad_token_id)
    assert out[0][0] == 0.0 and out[0][1] < 0


def test_acc_norm_divides_by_the_options_characters():
    # acc: -4 > -6 picks option 0; per character: -4/2 = -2 < -6/6 = -1 picks option 1.
    assert pick([-4.0, -6.0], ["ab", "abcdef"]) == 0
    assert pick([-4.0, -6.0], ["ab", "abcdef"], normalize_length=True) == 1
    assert pick([-1.0, -1.0], ["a", "b"]) == 0  # ties go to the first option


def test_binomial_standard_error_as_the_harness_reports_it():
    # p = 0.75 over 4 items: sample std sqrt(4/3 * 0.75 * 0.25) = 0.5, over sqrt(4): 0.25.
    assert binomial_stderr(3, 4) == pytest.approx(25.0)
    assert binomial_stderr(10, 10) == 0.0 and binomial_stderr(1, 1) is None


def test_evaluate_task_reports_acc_acc_norm_and_stderr():
    model, tok = load_model("tiny-random")
    task = _task(n=10)
    result = evaluate_task(model, tok, task)
    logliks = _full_sequence(model, tok, task)
    acc = sum(pick(ll, WORDS) == ex.answer_index for ll, ex in zip(logliks, task.test))
    norm = sum(pick(ll, WORDS, True) == ex.answer_index for ll, ex in zip(logliks, task.test))
    assert result.scores == {"acc": 10.0 * acc, "acc_norm": 10.0 * norm} and result.value == 10.0 * acc
    assert result.n == 10 and result.stderr == pytest.approx(binomial_stderr(acc, 10))
    task.choice_norm = True
    assert evaluate_task(model, tok, task).value == 10.0 * norm


def test_item_option_labels_map_the_answer_key():
    from retain.errors import RetainError
    from retain.streams.loaders import make_example

    fields = dict(input_field="input", output_field="output", options_field="options", metric="choice")
    arc = {"input": "q", "options": ["w", "x", "y", "z"], "option_labels": ["1", "2", "3", "4"], "output": "4"}
    assert make_example(arc, "f:74", **fields).output == "z"
    lettered = {**arc, "option_labels": ["A", "B", "C", "D"], "output": "C"}
    assert make_example(lettered, "f:1", **fields).output == "y"
    with pytest.raises(RetainError, match="f:2: field 'option_labels' has 3 labels for 4 options"):
        make_example({**arc, "option_labels": ["1", "2", "3"]}, "f:2", **fields)


def test_a_capped_split_is_a_seeded_sample_stratified_by_label():
    labels = ["a", "b", "c", "d"]
    sorted_by_label = [Example(f"{lab}{i}", lab, tuple(labels)) for lab in labels for i in range(25)]
    kept, sample = seeded_sample(sorted_by_label, 20, "task/test")
    assert [sum(ex.output == lab for ex in kept) for lab in labels] == [5, 5, 5, 5]
    assert sample.indices == sorted(sample.indices) and sample.stratified_by == "label" and sample.of == 100
    again, same = seeded_sample(sorted_by_label, 20, "task/test")
    assert again == kept and same == sample
    assert seeded_sample(sorted_by_label, 20, "task/test", seed=1)[1].indices != sample.indices
    mc = [Example(str(i), f"o{i % 3}", (f"o{i % 3}", f"p{i}", f"q{i}")) for i in range(30)]
    mc = [Example(ex.input, ex.output, ex.options[-(i % 3):] + ex.options[:-(i % 3)] if i % 3 else ex.options)
          for i, ex in enumerate(mc)]
    kept, sample = seeded_sample(mc, 9, "mc/test")
    assert sample.stratified_by == "answer position"
    assert sorted(ex.answer_index for ex in kept) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    uneven = [Example(str(i), "a" if i < 90 else "b", ("a", "b")) for i in range(100)]
    kept, _ = seeded_sample(uneven, 10, "u/test")
    assert [ex.output for ex in kept].count("b") == 1  # proportional: 9 and 1


def test_results_record_standard_errors_and_the_sample(tiny_config):
    from retain.config import load_config
    from retain.loop import execute

    results = execute(load_config(tiny_config("se", eval__max_test=4, eval__probe_max=5)), quiet=True)
    assert len(results["R_stderr"]) == 2 and len(results["base_stderr"]) == 2
    assert results["eval_samples"]["small"]["n"] == 4 and results["eval_samples"]["small"]["of"] == 6
    assert all(results["eval_samples"][p]["n"] == 5 for p in results["probe"]["names"])
    small = results["evaluations"][1]["scores"]["small"]
    assert {"acc", "acc_norm", "stderr", "n"} <= set(small) and small["n"] == 4
    assert results["task_scoring"] == {"upper": "exact_match", "small": "acc"}


def _prompt_pool(model):
    from retain.strategies.l2p import L2POptions, PromptPool

    return PromptPool(model, L2POptions(pool_size=4, prompt_length=2, top_n=1), ["a", "b"])


def _expert_mixture(model):
    from retain.strategies.lora_experts import ExpertMixture, ExpertOptions

    return ExpertMixture(model, ExpertOptions(r=2, alpha=4))


def _segment_router(model):
    from retain.strategies._lora import LoraOptions, wrap_with_lora
    from retain.strategies.tf_lora import SegmentRouter, segment

    router = SegmentRouter(wrap_with_lora(model, LoraOptions(r=2, alpha=4), adapter_name=segment(0)),
                           model.config.hidden_size)
    router.sums, router.counts = torch.randn(1, model.config.hidden_size), [1]  # one centroid: routing runs
    return router


@pytest.mark.parametrize("module, make", [("l2p", _prompt_pool), ("lora_experts", _expert_mixture),
                                          ("tf_lora", _segment_router)])
def test_wrappers_that_route_by_their_input_are_queried_by_the_prompt_not_the_scored_option(module, make,
                                                                                          monkeypatch):
    """Scoring an option appends it to the prompt; a wrapper that picks prompts, experts or
    adapters by the input must still see the prompt alone (as in training and generation),
    or each option of one item would be answered by a differently routed model."""
    import importlib

    from retain.embeddings import pooled_query
    from retain.evaluation.scoring import encoded_logprobs
    from retain.models import load_model

    model, _ = load_model("tiny-random", seed=0)
    wrapper = make(model.eval()).eval()
    seen = []
    target = importlib.import_module(f"retain.strategies.{module}")

    def recording(*args, **kwargs):
        seen.append(pooled_query(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(target, "pooled_query", recording)
    prompt, option = [5, 6, 7, 8], [9, 10, 11]
    ids = torch.tensor([prompt])
    if module == "tf_lora":  # its query is taken inside the routing, with the adapters off
        wrapper.routes(ids, torch.ones_like(ids))
        alone = seen[-1]
    else:
        alone = wrapper.query(ids, torch.ones_like(ids), None)
    seen.clear()
    encoded_logprobs(wrapper, [(prompt + option, len(option)), (prompt + option[:1], 1)], pad=0)
    assert len(seen) == 1 and seen[0].shape[0] == 2
    for row in seen[0]:
        assert torch.allclose(row, alone[0], atol=1e-5)
