"""Prompts longer than the model's positions (or eval.max_length) are cut from the left, as
lm-evaluation-harness cuts them, in every scorer: generation, choices, continuations."""

import logging
import pytest

from retain.embeddings import ModelWrapper
from retain.evaluation.scoring import (choice_logliks, context_limit, continuation_logprobs, evaluate_task, generate,
                                       shared_prefix_logliks)
from retain.models import load_model
from retain.streams.task import Example, Task


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def test_the_limit_is_the_smaller_of_positions_and_max_length(tiny):
    model, _ = tiny
    positions = model.config.max_position_embeddings
    assert context_limit(model) == positions
    assert context_limit(model, 100) == 100
    assert context_limit(model, 10 * positions) == positions
    wrapped = ModelWrapper(model)
    wrapped.added_positions = 10  # soft prompts in front of every input take positions too
    assert context_limit(wrapped) == positions - 10


def test_generation_cuts_a_long_prompt_from_the_left_and_says_so(tiny, caplog):
    model, tok = tiny  # the tiny tokenizer: one token per byte, no BOS
    prompt = "abcdefghij" * 12
    with caplog.at_level(logging.WARNING, logger="retain.evaluation.scoring"):
        cut = generate(model, tok, [prompt, "short"], max_new_tokens=4, max_length=40, what="task t")
    assert "task t: 1 of 2 prompts are longer than 36 tokens" in caplog.text
    # The same answers as the prompt's last 36 tokens (40 less the 4 new ones) given on their own.
    assert cut == generate(model, tok, [prompt[-36:], "short"], max_new_tokens=4)



def test_generation_feeds_the_model_the_prompts_tail(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or real(**kw))
    generate(model, tok, ["abcdefghij" * 12], max_new_tokens=4, max_length=40)
    assert seen == [tok("abcdefghij" * 12)["input_ids"][-36:]]
    seen.clear()
    generate(model, tok, ["abcdefghij" * 12], max_new_tokens=4)  # within the model's positions: whole
    assert len(seen[0]) == 120


def test_choices_score_the_prompts_tail_within_the_limit(tiny):
    model, tok = tiny
    task = Task("c", [], [Example("xyz" * 30, "yes", ("yes", "no"))], metric="choice", answer_prefix=" ")
    prompt = tok(task.prompt(tok, task.test[0]), add_special_tokens=True)["input_ids"]
    options = [tok(task.target(o), add_special_tokens=False)["input_ids"] for o in ("yes", "no")]
    limit = 30
    [got] = choice_logliks(model, tok, task, task.test, max_length=limit, shared_prefix=True)
    [expected] = shared_prefix_logliks(model, [prompt[-(limit - max(map(len, options))):]], [options],
                                       tok.pad_token_id)
    [uncut] = shared_prefix_logliks(model, [prompt], [options], tok.pad_token_id)
    assert got == pytest.approx(expected, abs=1e-5)
    assert got != pytest.approx(uncut, abs=1e-5)
    # Scoring each option as a whole sequence cuts the same way.
    [whole] = choice_logliks(model, tok, task, task.test, max_length=limit, shared_prefix=False)
    assert whole == pytest.approx(expected, abs=1e-4)


def test_continuations_keep_the_answer_and_cut_the_prompt(tiny):
    model, tok = tiny
    [(lp, n)] = continuation_logprobs(model, tok, [("q" * 50 + "p" * 13, " answer")], max_length=20)
    assert (lp, n) == continuation_logprobs(model, tok, [("p" * 13, " answer")])[0]
    assert n == len(" answer")


def test_evaluate_task_passes_the_limit_on(tiny, caplog):
    model, tok = tiny
    task = Task("g", [], [Example("q" * 200, "zz")], metric="exact_match")
    with caplog.at_level(logging.WARNING, logger="retain.evaluation.scoring"):
        cut = evaluate_task(model, tok, task, max_new_tokens=3, max_length=16)
    assert "task g: 1 of 1 prompts are longer than 13 tokens" in caplog.text
    assert cut.predictions == generate(model, tok, [task.prompt(tok, task.test[0])[-13:]], max_new_tokens=3)
