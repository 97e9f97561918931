"""The field's benchmarks by name: task orders, label sets, metrics, prompts, caps, and the
readers of the benchmarks' own release layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retain.config import load_config, validate_config
from retain.errors import RetainError
from retain.streams import build_stream
from retain.streams.benchmarks import DEFAULT_PROBES, NAMED_STREAMS, PROBES, named_stream, probe_suite

STANDARD_LABELS = {
    "agnews": ["World", "Sports", "Business", "Science or Technology"],
    "amazon": ["very negative", "negative", "neutral", "positive", "very positive"],
    "yahoo": ["Business & Finance", "Computers & Internet", "Education & Reference", "Entertainment & Music",
              "Family & Relationships", "Health", "Politics & Government", "Science & Mathematics",
              "Society & Culture", "Sports"],
}


@pytest.mark.parametrize("order, tasks", [
    (1, ["dbpedia", "amazon", "yahoo", "agnews"]), (2, ["dbpedia", "amazon", "agnews", "yahoo"]),
    (3, ["yahoo", "amazon", "agnews", "dbpedia"]),
])
def test_standard_cl_orders_labels_and_prompts(order, tasks):
    stream = named_stream("standard-cl", order)
    assert stream.task_names == tasks and stream.order == order
    for task in stream.tasks:
        assert task.metric == "choice" and len(task.test) == 500 and task.train
        labels = task.test[0].options
        assert all(ex.options == labels and ex.output in labels for ex in task.test + task.train)
        if task.name in STANDARD_LABELS:
            assert sorted(labels) == sorted(STANDARD_LABELS[task.name])
        # The prompt states the label set, then the input, then asks for the answer.
        prompt = task.prompt(None, task.test[0])
        assert prompt.startswith(("What is the topic of the content? Option: ",
                                  "What is the sentiment of the following paragraph? Option: "))
        assert ", ".join(labels) in prompt and task.test[0].input in prompt and prompt.endswith("\nAnswer:")
    assert len(named_stream("standard-cl", 1).tasks[0].test[0].options) == 14  # DBpedia's 14 classes


def test_long_cl_orders_hold_the_fifteen_tasks_once_each():
    spec = NAMED_STREAMS["long-cl"]
    assert sorted(spec.orders) == [4, 5, 6]
    for order, names in spec.orders.items():
        assert len(names) == 15 and len(set(names)) == 15 and set(names) == set(spec.tasks)
    assert spec.orders[4][:4] == ["mnli", "cb", "wic", "copa"] and spec.orders[6][-3:] == ["multirc", "boolq", "wic"]
    stream = named_stream("long-cl")
    assert stream.order == 4 and stream.task_names == spec.orders[4]
    copa = stream.tasks[3]
    assert copa.test[0].options == ("A", "B") and "Choose one between A and B" in copa.prompt(None, copa.test[0])
    cb = stream.tasks[1]
    assert set(cb.test[0].options) == {"entailment", "contradiction", "neutral"} and len(cb.test) == 56


def test_trace_has_its_order_and_metric_per_task():
    stream = named_stream("trace")
    metrics = {t.name: t.metric for t in stream.tasks}
    assert list(metrics) == ["cstance", "fomc", "meetingbank", "py150", "scienceqa", "numglue-cm", "numglue-ds",
                             "20minuten"]
    assert metrics == {"cstance": "choice", "fomc": "choice", "meetingbank": "rouge_l", "py150": "edit_similarity",
                       "scienceqa": "choice_letter", "numglue-cm": "number", "numglue-ds": "number",
                       "20minuten": "sari"}
    by_name = {t.name: t for t in stream.tasks}
    assert by_name["fomc"].test[0].options == ("A", "B", "C")
    assert "A. dovish, B. hawkish, C. neutral" in by_name["fomc"].prompt(None, by_name["fomc"].test[0])
    # Summaries get room to answer; a label does not.
    assert by_name["meetingbank"].max_new_tokens >= 100 and by_name["scienceqa"].max_new_tokens <= 8


def test_superni_orders_prompt_with_the_task_definition():
    spec = NAMED_STREAMS["superni-cl"]
    assert spec.orders[1][:3] == ["task1572", "task363", "task1290"]
    assert spec.orders[2][:3] == ["task1687", "task363", "task875"]
    assert all(sorted(o) == sorted(spec.tasks) and len(o) == 15 for o in spec.orders.values())
    task = named_stream("superni-cl").tasks[5]  # task1510: relation extraction
    assert task.name == "task1510" and task.metric == "rouge_l"
    prompt = task.prompt(None, task.test[0])
    assert prompt.startswith("Definition: Given a phrase describing the relationship") and prompt.endswith("Output:")
    assert prompt == task.test[0].input + "\nOutput:" and "\n\nInput: person can have" in prompt


def test_stream_caps_are_seeded_samples_stratified_by_label(tmp_path):
    cfg = validate_config({"name": "s", "stream": {"name": "standard-cl", "order": 3, "max_train": 20,
                                                    "max_test": 30}, "eval": {"probe": False}})
    stream = build_stream(cfg)
    again = build_stream(cfg)
    assert stream.task_names == ["yahoo", "amazon", "agnews", "dbpedia"]
    for task, same in zip(stream.tasks, again.tasks):
        assert len(task.train) == 20 and len(task.test) == 30 and task.test == same.test
        assert task.sample.stratified_by == "label" and task.sample.of == 500
    full = named_stream("standard-cl", 3).tasks[1].test  # amazon: 75 to 117 items per label
    amazon = stream.tasks[1]
    for label in amazon.test[0].options:  # each label keeps its share of the 30 items
        share = 30 * sum(ex.output == label for ex in full) / len(full)
        assert abs(sum(ex.output == label for ex in amazon.test) - share) < 1


@pytest.mark.parametrize("stream, fragment", [
    ({"name": "standard-cl", "order": 4}, "stream 'standard-cl' has no order 4; orders: 1, 2, 3"),
    ({"name": "nope"}, "unknown stream 'nope'; built-in streams: arithmetic, domains, long-cl, numbers"),
    ({"name": "numbers", "max_test": 3}, "'max_test' applies to the named benchmarks only"),
    ({"name": "trace", "shuffle": True}, "'stream.shuffle': unknown key"),
    ("long-cl-x", "unknown stream 'long-cl-x'"),
])
def test_bad_stream_settings_are_refused_with_what_is_valid(stream, fragment):
    with pytest.raises(RetainError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        validate_config({"name": "s", "stream": stream})


# -- probes ------------------------------------------------------------------------------
def test_every_probe_loads_with_its_chance_level_and_prompt():
    chance = {"mmlu": 25, "arc-easy": 25, "arc-challenge": 25, "hellaswag": 25, "piqa": 50, "csqa": 20, "boolq": 50,
              "gsm8k": 0}
    for name in PROBES:
        task = probe_suite(name)
        assert task.name == name and len(task.test) == 500
        assert task.chance == pytest.approx(chance[name], abs=0.1)
    mmlu = probe_suite("mmlu")
    prompt = mmlu.prompt(None, mmlu.test[0])
    assert prompt.startswith("The following are multiple choice questions (with answers) about ")
    assert "\nA. " in prompt and "\nD. " in prompt and prompt.endswith("Answer:")
    assert mmlu.test[0].options == ("A", "B", "C", "D")
    boolq = probe_suite("boolq")
    assert boolq.test[0].options == ("no", "yes") and "\nQuestion: " in boolq.test[0].input
    hellaswag = probe_suite("hellaswag")
    assert hellaswag.choice_norm and not any("[" in o for ex in hellaswag.test for o in ex.options)
    gsm8k = probe_suite("gsm8k")
    assert gsm8k.metric == "number" and gsm8k.format == "chat" and gsm8k.max_new_tokens == 256


@pytest.mark.parametrize("probe, names", [
    (True, list(DEFAULT_PROBES)), (False, []), ("mmlu", ["mmlu"]), (["facts", "gsm8k"], ["facts", "gsm8k"]),
])
def test_eval_probe_names_the_suites(probe, names):
    cfg = validate_config({"name": "s", "stream": "numbers", "eval": {"probe": probe, "probe_max": 5}})
    stream = build_stream(cfg)
    assert [p.name for p in stream.probes] == names
    assert all(len(p.test) == 5 for p in stream.probes)


@pytest.mark.parametrize("eval_, fragment", [
    ({"probe": "squad"}, "eval.probe: unknown probe 'squad'; valid: true, false, mmlu, arc-easy"),
    ({"probe": ["mmlu", "mmlu"]}, "'mmlu' is named twice"),
])
def test_bad_probe_names_are_refused(eval_, fragment):
    with pytest.raises(RetainError, match=fragment):
        validate_config({"name": "s", "stream": "numbers", "eval": eval_})


def test_a_task_may_not_take_a_probe_name(tiny_config):
    path = tiny_config("clash", eval__probe=["piqa"])
    data = path.read_text().replace("name: small", "name: piqa")
    path.write_text(data)
    with pytest.raises(RetainError, match="task 'piqa' has the name of a probe"):
        load_config(path)


def test_results_report_each_probe_with_its_chance_level(tiny_config):
    from retain.loop import execute

    results = execute(load_config(tiny_config("p", eval__probe=["piqa", "facts"], eval__probe_max=6)), quiet=True)
    probe = results["probe"]
    assert probe["names"] == ["piqa", "facts"]
    piqa, facts = probe["suites"]["piqa"], probe["suites"]["facts"]
    assert piqa["chance"] == 50.0 and facts["chance"] == 25.0 and piqa["scoring"] == "acc_norm"
    assert len(piqa["after_phase"]) == 2 and piqa["n"] == 6
    for i, e in enumerate(results["evaluations"]):
        values = [e["scores"][n]["value"] for n in probe["names"]]
        mean = sum(values) / 2
        assert (probe["base"] if i == 0 else probe["after_phase"][i - 1]) == pytest.approx(mean, abs=1e-4)
    assert piqa["base"] == pytest.approx(results["evaluations"][0]["scores"]["piqa"]["value"], abs=1e-4)


def test_a_named_stream_runs_end_to_end_on_tiny_random(tmp_path):
    from retain.loop import execute

    cfg = validate_config({"name": "b", "model": "tiny-random", "output_dir": str(tmp_path),
                           "stream": {"name": "standard-cl", "order": 2, "max_train": 8, "max_test": 4},
                           "train": {"max_steps": 2, "batch_size": 4, "max_length": 64},
                           "eval": {"probe": ["arc-easy"], "probe_max": 4}})
    results = execute(cfg, quiet=True)
    assert results["tasks"] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert results["stream"] == "standard-cl" and results["stream_order"] == 2
    assert len(results["R"]) == 4 and all(len(row) == 4 for row in results["R"])
    assert results["task_metrics"] == dict.fromkeys(results["tasks"], "choice")
    report = (tmp_path / "b" / "report.md").read_text()
    assert "## General-ability probes" in report and "| arc-easy | acc_norm | 4 | 25.0 |" in report


# -- upstream layouts ------------------------------------------------------------------------
def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _olora(root: Path) -> None:
    folders = {"dbpedia": "TC/dbpedia", "amazon": "SC/amazon", "yahoo": "TC/yahoo", "agnews": "TC/agnews"}
    for task, folder in folders.items():
        labels = [f"{task}-a", f"{task}-b"]
        rows = [{"sentence": f"Title: {task} {i}\nText: item {i}", "label": labels[i % 2]} for i in range(6)]
        _dump(root / "CL_Benchmark" / folder / "train.json", rows)
        # yahoo has a dev split only, as several upstream copies do.
        _dump(root / "CL_Benchmark" / folder / ("dev.json" if task == "yahoo" else "test.json"), rows[:4])
        _dump(root / "CL_Benchmark" / folder / "labels.json", labels)


def test_olora_layout_is_read_with_its_labels(tmp_path):
    _olora(tmp_path)
    stream = named_stream("standard-cl", 1, str(tmp_path))
    assert stream.task_names == ["dbpedia", "amazon", "yahoo", "agnews"]
    dbpedia = stream.tasks[0]
    assert len(dbpedia.train) == 6 and len(dbpedia.test) == 4
    assert dbpedia.test[1].options == ("dbpedia-a", "dbpedia-b") and dbpedia.test[1].output == "dbpedia-b"
    assert dbpedia.prompt(None, dbpedia.test[0]).startswith("What is the topic of the content? Option: dbpedia-a, ")
    # data_dir may also name CL_Benchmark itself.
    assert named_stream("standard-cl", 1, str(tmp_path / "CL_Benchmark")).tasks[0].test == dbpedia.test


def test_trace_layout_is_read(tmp_path):
    root = tmp_path / "LLM-CL-Benchmark_500"
    for task in NAMED_STREAMS["trace"].tasks.values():
        answer = "B" if task.metric == "choice" else "42"
        rows = [{"prompt": f"{task.upstream} question {i}\nAnswer:", "answer": answer} for i in range(3)]
        _dump(root / task.upstream / "train.json", rows)
        _dump(root / task.upstream / "test.json", rows[:2])
    stream = named_stream("trace", None, str(root))
    fomc = stream.tasks[1]
    assert fomc.name == "fomc" and fomc.test[0].options == ("A", "B", "C") and fomc.test[0].output == "B"
    assert stream.tasks[5].test[0].output == "42" and len(stream.tasks[5].train) == 3


def test_superni_layout_is_read_with_the_definition(tmp_path):
    for name, task in NAMED_STREAMS["superni-cl"].tasks.items():
        data = {"Definition": [f"Do {name}."], "Instances": [{"id": str(i), "input": f"in {i}", "output": [f"out {i}", "x"]}
                                                           for i in range(3)]}
        for split in ("train", "test"):
            _dump(tmp_path / "CL_Benchmark" / task.upstream / f"{split}.json", data)
    task = named_stream("superni-cl", 2, str(tmp_path)).tasks[0]
    assert task.name == "task1687" and task.test[1].output == "out 1"
    assert task.test[1].answers == ("out 1", "x")  # every reference is kept, the first is the output
    assert task.prompt(None, task.test[1]) == "Definition: Do task1687.\n\nInput: in 1\nOutput:"


@pytest.mark.parametrize("damage, fragment", [
    (lambda root: (root / "CL_Benchmark/TC/agnews/labels.json").unlink(), "TC/agnews: no labels.json"),
    (lambda root: (root / "CL_Benchmark/SC/amazon/train.json").write_text("[{\"sentence\": 1}]"),
     "record 0 needs fields 'sentence' and 'label'"),
    (lambda root: (root / "CL_Benchmark/SC/amazon/test.json").write_text("{oops"), "amazon/test.json:1: invalid JSON"),
    (lambda root: __import__("shutil").rmtree(root / "CL_Benchmark/TC/yahoo"),
     "no folder TC/yahoo \\(expected O-LoRA's CL_Benchmark/ layout\\)"),
])
def test_a_broken_upstream_copy_names_the_file_and_what_is_expected(tmp_path, damage, fragment):
    _olora(tmp_path)
    damage(tmp_path)
    with pytest.raises(RetainError, match=fragment):
        named_stream("standard-cl", 1, str(tmp_path))


def test_superni_items_with_several_references_score_the_best_one():
    from retain.evaluation.scoring import item_score
    from retain.evaluation.text_metrics import rouge_l

    task = {t.name: t for t in named_stream("superni-cl").tasks}["task748"]
    multi = [ex for ex in task.test if ex.references]
    assert len(multi) == 23 and all(ex.answers[0] == ex.output and len(ex.answers) > 1 for ex in multi)
    ex = multi[0]
    other = ex.answers[1]
    # An answer equal to the second reference scores 100, though it differs from the first.
    assert rouge_l(other, ex.output) < 100 and item_score("rouge_l", other, ex) == 100.0
    assert item_score("exact_match", other, ex) == 100.0
    assert item_score("rouge_l", "zzz", ex) == 0.0
