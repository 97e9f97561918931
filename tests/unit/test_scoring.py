import math

import torch

from retain.evaluation.scoring import continuation_logprobs, encode_pair, normalize, score_task
from retain.models import load_model
from retain.streams.task import Example, Task


def test_normalize():
    assert normalize("  Yes.\nmore text") == "yes"
    assert normalize('"Paris,"') == "paris"
    assert normalize("New   York!") == "new york"


def test_choice_logprob_matches_a_manual_forward():
    model, tok = load_model("tiny-random")
    (lp, n), = continuation_logprobs(model, tok, [("Q: hi\nA:", " yes")])
    ids, n_cont = encode_pair(tok, "Q: hi\nA:", " yes")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    manual = sum(torch.log_softmax(logits[i - 1], -1)[ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))
    assert n == n_cont == 4 and math.isclose(lp, manual, rel_tol=1e-5)


def test_batched_scores_equal_single_scores():
    model, tok = load_model("tiny-random")
    pairs = [("a", " b"), ("a much longer prompt here", " c d"), ("x", " yes")]
    batched = continuation_logprobs(model, tok, pairs, batch_size=3)
    single = [continuation_logprobs(model, tok, [p], batch_size=1)[0] for p in pairs]
    for (a, na), (b, nb) in zip(batched, single):
        assert na == nb and math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def test_perplexity_is_exp_of_mean_token_nll():
    model, tok = load_model("tiny-random")
    task = Task("raw", [], [Example("", "hello world")], metric="perplexity", answer_prefix="")
    ppl = score_task(model, tok, task)
    (lp, n), = continuation_logprobs(model, tok, [("", "hello world")])
    assert n == len("hello world") - 1 and math.isclose(ppl, math.exp(-lp / n), rel_tol=1e-6)


def test_exact_match_and_choice_are_percentages():
    model, tok = load_model("tiny-random")
    task = Task("t", [], [Example("q", "yes", ("yes", "no")), Example("r", "no", ("yes", "no"))], metric="choice")
    assert score_task(model, tok, task) in (0.0, 50.0, 100.0)
    gen = Task("g", [], [Example("q", "zz")], metric="exact_match")
    assert score_task(model, tok, gen, max_new_tokens=2) == 0.0
