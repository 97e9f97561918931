"""Every malformed input a user can hand the command line is refused the same way: one
line naming the file and line or the key and what would be valid, exit code 2, no
traceback, and nothing written (no run directory; an existing run left byte-identical).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.conftest import write_jsonl

# -- helpers -------------------------------------------------------------------------


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The real entry point (``retain.cli.main``) in this process: exit code and stderr."""
    from retain import cli as entry

    monkeypatch.setattr(sys, "argv", ["retain", *map(str, args)])
    try:
        entry.main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def edit_config(path: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def task(data: dict, i: int = 0) -> dict:
    return data["tasks"][i]


def assert_refused(code: int, err: str, fragment: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err


# -- data files and configs: `retain run CONFIG` -----------------------------------------

CHOICE = {"input": "x", "output": "yes", "options": ["yes", "no"]}


def _write(name: str, text: str | bytes):
    def mutate(tmp: Path, cfg: Path) -> None:
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def _rows(name: str, rows: list):
    def mutate(tmp: Path, cfg: Path) -> None:
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mutate


def _cfg(change: Callable[[dict], None]):
    def mutate(tmp: Path, cfg: Path) -> None:
        edit_config(cfg, change)
    return mutate


def _csv_task(text: str | bytes):
    def mutate(tmp: Path, cfg: Path) -> None:
        path = tmp / "b.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        edit_config(cfg, lambda d: task(d, 1).update(test=str(path)))
    return mutate


def _set(**updates):
    return _cfg(lambda d: d.update(updates))


def _task_set(i=0, **updates):
    return _cfg(lambda d: task(d, i).update(updates))


def _gguf(content: bytes):
    def mutate(tmp: Path, cfg: Path) -> None:
        (tmp / "model.gguf").write_bytes(content)
        edit_config(cfg, lambda d: d.update(model=str(tmp / "model.gguf")))
    return mutate


def _model_dir(config_text: str | None):
    def mutate(tmp: Path, cfg: Path) -> None:
        folder = tmp / "model-dir"
        folder.mkdir()
        if config_text is not None:
            (folder / "config.json").write_text(config_text)
        edit_config(cfg, lambda d: d.update(model=str(folder)))
    return mutate


def _probe(text: str):
    def mutate(tmp: Path, cfg: Path) -> None:
        (tmp / "probe.jsonl").write_text(text)
        edit_config(cfg, lambda d: d["eval"].update(probe_file=str(tmp / "probe.jsonl")))
    return mutate


RUN_CASES = [
    # data lines
    ("json-invalid", _write("b_test.jsonl", json.dumps(CHOICE) + "\nnot json\n"), "b_test.jsonl:2: invalid JSON"),
    ("utf8-invalid", _write("a_train.jsonl", b'{"input": "a", "output": "A"}\n{"input": "b", "output": "B"}\n'
                            b'{"input": "\xff\xfe", "output": "C"}\n'), "a_train.jsonl:3: not valid UTF-8"),
    ("input-object", _rows("a_train.jsonl", [{"input": {"a": 1}, "output": "A"}]),
     "a_train.jsonl:1: field 'input' is a JSON object (its keys: a)"),
    ("output-list", _rows("a_train.jsonl", [{"input": "a", "output": ["A", "B"]}]),
     "a_train.jsonl:1: field 'output' is a JSON list"),
    ("line-is-array", _rows("a_test.jsonl", [["a", "A"]]), "a_test.jsonl:1: expected an object with fields, got list"),
    ("line-is-number", _write("a_test.jsonl", "3\n"), "a_test.jsonl:1: expected an object with fields, got int"),
    ("missing-output", _rows("a_train.jsonl", [{"input": "a"}]), "a_train.jsonl:1: missing field 'output'"),
    ("null-output", _rows("a_train.jsonl", [{"input": "a", "output": None}]), "missing field 'output'"),
    ("empty-object", _rows("a_train.jsonl", [{}]), "a_train.jsonl:1: missing field 'input' (fields present: none)"),
    ("options-number", _rows("b_test.jsonl", [{**CHOICE, "options": 3}]), "must be a list of at least 2 options"),
    ("options-one", _rows("b_test.jsonl", [{**CHOICE, "options": ["yes"]}]), "must be a list of at least 2 options"),
    ("options-nested", _rows("b_test.jsonl", [{**CHOICE, "options": ["yes", {"no": 1}]}]),
     "field 'options' holds a JSON object"),
    ("options-json-broken", _csv_task('input,output,options\nx,yes,"[""yes"", ""no"""\n'), "is not a valid JSON list"),
    ("output-not-option", _rows("b_test.jsonl", [{**CHOICE, "output": "maybe"}]), "output 'maybe' is not one of"),
    ("references-not-list", _rows("a_test.jsonl", [{"input": "a", "output": "A", "all_outputs": "A"}]),
     "a_test.jsonl:1: field 'all_outputs' must be a list of texts"),
    ("choice-no-options", _rows("b_test.jsonl", [{"input": "x", "output": "yes"}]),
     "metric 'choice' needs an options list in field 'options'"),
    ("empty-test", _write("b_test.jsonl", ""), "task 'small': test data"),
    ("blank-lines-only", _write("a_train.jsonl", "\n\n  \n"), "task 'upper': train data"),
    ("file-missing", _task_set(0, train="nowhere.jsonl"), "data file not found: nowhere.jsonl"),
    ("file-is-folder", lambda tmp, cfg: (tmp / "folder.jsonl").mkdir() or edit_config(
        cfg, lambda d: task(d).update(train=str(tmp / "folder.jsonl"))), "is not a file"),
    ("file-type", lambda tmp, cfg: (tmp / "a.txt").write_text("x") and edit_config(
        cfg, lambda d: task(d).update(train=str(tmp / "a.txt"))), "unsupported data file type '.txt'"),
    ("csv-extra-values", _csv_task("input,output,options\nx,yes,yes|no\ny,no,yes|no,extra\n"),
     "b.csv:3: more values than header columns"),
    ("csv-utf8", _csv_task(b"input,output,options\nx,yes,yes|no\n\xc3\x28,no,yes|no\n"), "b.csv:3: not valid UTF-8"),
    ("csv-short-row", _csv_task("input,output,options\nx\n"), "b.csv:2: missing field 'output'"),
    ("probe-missing", _cfg(lambda d: d["eval"].update(probe_file="no-probe.jsonl")), "data file not found"),
    ("probe-bad-json", _probe(json.dumps(CHOICE) + "\n{oops\n"), "probe.jsonl:2: invalid JSON"),
    ("probe-empty", _probe(""), "has no examples"),
    # config keys and values
    ("unknown-key", _set(bogus_key=1), "unknown key 'bogus_key'; valid top-level keys:"),
    ("unknown-train-key", _cfg(lambda d: d["train"].update(max_stepz=3)), "'train.max_stepz': unknown key"),
    ("wrong-type", _cfg(lambda d: d["train"].update(max_steps="many")), "'train.max_steps'"),
    ("out-of-range", _cfg(lambda d: d["train"].update(lr=-1)), "'train.lr'"),
    ("eval-range", _cfg(lambda d: d["eval"].update(batch_size=0)), "'eval.batch_size'"),
    ("unknown-strategy", _set(strategy="nonesuch"), "unknown strategy 'nonesuch'; valid:"),
    ("empty-strategy-part", _set(strategy="lora+"), "has an empty part"),
    ("two-owners", _set(strategy="lora+lora-per-task"), "both decide which weights train"),
    ("es-olora", _set(strategy="es+olora"), "es replaces the gradient step, so olora's extra_loss would never run"),
    ("es-l2p", _set(strategy="es+l2p"), "es replaces the gradient step, so l2p's extra_loss would never run"),
    ("grpo-generative", _set(strategy="grpo+generative-replay"),
     "grpo trains each phase itself, so generative-replay's batches would never run"),
    ("ewc-adapters", _set(strategy="ewc+adapter-per-task"),
     "adapter-per-task trains new parameters for each task and freezes earlier ones, so ewc"),
    ("merge-alone", _set(strategy="merge"), "strategy 'merge' needs 'lora-per-task'"),
    ("option-range", _set(strategy="replay", replay={"ratio": 1.5}), "'replay.ratio'"),
    ("option-unknown", _set(strategy="lora", lora={"rank": 4}), "'lora.rank': unknown key"),
    ("sparse-decay", lambda tmp, cfg: edit_config(cfg, lambda d: (d.update(strategy="sparse"),
                                                                 d["train"].update(weight_decay=0.1))),
     "sparse needs train.weight_decay: 0"),
    ("merge-weights", _set(strategy="lora-per-task+merge", merge={"weights": [1, 1, 1]}),
     "merge.weights has 3 values; the stream has 2 tasks"),
    ("l2p-pool", _set(strategy="l2p", l2p={"pool_size": 4, "top_n": 3}), "l2p.pool_size 4 gives 2 prompts per task"),
    ("grpo-batch", lambda tmp, cfg: edit_config(cfg, lambda d: (d.update(strategy="grpo"),
                                                               d["train"].update(batch_size=3))),
     "must be a multiple of grpo.num_generations"),
    ("es-perplexity", lambda tmp, cfg: edit_config(cfg, lambda d: (d.update(strategy="es"),
                                                                  task(d).update(metric="perplexity"))),
     "es needs tasks with answers to reward; 'upper' is scored by perplexity"),
    ("task-name-escape", _task_set(0, name="../../../../escaped"), "task name '../../../../escaped' may hold only"),
    ("task-name-dot", _task_set(0, name="a.b"), "task name 'a.b' may hold only"),
    ("run-name-dots", _set(name=".."), "run name '..' may hold only"),
    ("run-name-slash", _set(name="a/b"), "run name 'a/b' may hold only"),
    ("stream-and-tasks", _set(stream="numbers"), "give exactly one of 'stream'"),
    ("unknown-stream", lambda tmp, cfg: edit_config(cfg, lambda d: (d.pop("tasks"), d.update(stream="nope"))),
     "unknown stream 'nope'; built-in streams:"),
    ("template", _task_set(0, template="no placeholder"), "template must contain '{input}'"),
    ("duplicate-tasks", _task_set(1, name="upper"), "task names must be unique"),
    ("metric", _task_set(0, metric="bleu"), "'tasks.0.metric'"),
    ("files-and-dataset", _task_set(0, dataset="some/dataset"), "either train/test files or a dataset"),
    ("tasks-empty", _set(tasks=[]), "'tasks' is empty"),
    ("yaml-invalid", lambda tmp, cfg: cfg.write_text("name: [unclosed\n"), "invalid YAML"),
    ("yaml-list", lambda tmp, cfg: cfg.write_text("- a\n- b\n"), "the config must be a mapping of keys, got list"),
    # model files
    ("gguf-missing", _set(model="missing.gguf"), "GGUF file not found"),
    ("gguf-random", _gguf(bytes(range(256)) * 4), "could not be read as a GGUF model"),
    ("gguf-truncated", _gguf(b"GGUF\x03\x00\x00\x00garbage"), "could not be read as a GGUF model"),
    ("gguf-empty", _gguf(b""), "could not be read as a GGUF model"),
    ("model-unknown", _set(model="./nowhere"), "unknown model './nowhere'"),
    ("model-dir-no-config", _model_dir(None), "has no config.json"),
    ("model-dir-bad-config", _model_dir("{not json"), "could not be loaded"),
]


@pytest.mark.parametrize("name, mutate, fragment", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_run_input_is_refused_cleanly(name, mutate, fragment, tiny_config, tmp_path, monkeypatch, capsys):
    cfg = tiny_config("bad")
    mutate(tmp_path, cfg)
    code, err = cli(monkeypatch, capsys, "run", cfg, "-q")
    assert_refused(code, err, fragment)
    assert not (tmp_path / "runs").exists()


def test_the_battery_is_large():
    assert len(RUN_CASES) + len(RUN_DIR_CASES) + len(OTHER_CASES) >= 40


# -- other command-line input -------------------------------------------------------------

OTHER_CASES = [
    ("config-missing", lambda tmp: ["run", tmp / "nope.yaml"], "config file not found"),
    ("override-no-equals", lambda tmp: ["run", tmp / "ok.yaml", "train.max_steps"], "is not of the form key=value"),
    ("override-unknown-key", lambda tmp: ["run", tmp / "ok.yaml", "train.max_stepz=3"], "'train.max_stepz'"),
    ("config-and-resume", lambda tmp: ["run", tmp / "ok.yaml", "--resume", tmp], "give either CONFIG or --resume"),
    ("resume-not-a-run", lambda tmp: ["run", "--resume", tmp / "nothing"], "is not a run directory"),
    ("report-no-results", lambda tmp: ["report", tmp], "not found: is"),
    ("list-unknown", lambda tmp: ["list", "nonesuch"], "unknown strategy 'nonesuch'"),
    ("validate-refused", lambda tmp: ["validate", tmp / "es-olora.yaml"], "olora's extra_loss would never run"),
]


@pytest.mark.parametrize("name, args, fragment", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_bad_command_line_is_refused_cleanly(name, args, fragment, tiny_config, tmp_path, monkeypatch, capsys):
    tiny_config("ok")  # written as ok.yaml
    edit_config(tiny_config("es-olora"), lambda d: d.update(strategy="es+olora"))
    code, err = cli(monkeypatch, capsys, *args(tmp_path))
    assert_refused(code, err, fragment)
    assert not (tmp_path / "runs").exists()


# -- run directories: `retain run --resume RUN` ----------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished naive run on tiny-random, copied by each case."""
    from tests.conftest import task_rows

    base = tmp_path_factory.mktemp("finished")
    write_jsonl(base / "a.jsonl", task_rows("upper", 8))
    write_jsonl(base / "b.jsonl", task_rows("choice", 8))
    cfg = {"name": "done", "model": "tiny-random", "output_dir": str(base / "runs"),
           "tasks": [{"name": "upper", "train": str(base / "a.jsonl"), "test": str(base / "a.jsonl")},
                     {"name": "small", "train": str(base / "b.jsonl"), "test": str(base / "b.jsonl"),
                      "metric": "choice"}],
           "train": {"max_steps": 2, "batch_size": 4}, "eval": {"probe_max": 4, "max_new_tokens": 2}}
    from retain.config import validate_config
    from retain.loop import execute

    execute(validate_config(cfg), quiet=True)
    return base / "runs" / "done"


def _ckpt(run: Path) -> Path:
    return run / "checkpoints"


def _trained(run: Path) -> Path:
    return next(_ckpt(run).glob("trained-*.safetensors"))


RUN_DIR_CASES = [
    ("config-yaml-invalid", lambda run: (run / "config.yaml").write_text("name: [x\n"), "invalid YAML"),
    ("config-yaml-key", lambda run: (run / "config.yaml").write_text((run / "config.yaml").read_text()
                                                                     + "bogus: 1\n"), "unknown key 'bogus'"),
    ("config-yaml-missing", lambda run: (run / "config.yaml").unlink(), "is not a run directory (no config.yaml)"),
    ("state-corrupt", lambda run: (_ckpt(run) / "state.json").write_text("{not json"), "corrupt checkpoint state"),
    ("state-list", lambda run: (_ckpt(run) / "state.json").write_text("[]"), "not a JSON object"),
    ("state-binary", lambda run: (_ckpt(run) / "state.json").write_bytes(b"\xff\xfe\x00"), "corrupt checkpoint state"),
    ("state-unknown-key", lambda run: (_ckpt(run) / "state.json").write_text(json.dumps(
        {**json.loads((_ckpt(run) / "state.json").read_text()), "surprise": 1})), "unknown checkpoint key 'surprise'"),
    ("state-wrong-shape", lambda run: (_ckpt(run) / "state.json").write_text(json.dumps(
        {**json.loads((_ckpt(run) / "state.json").read_text()), "progress": {"phase": 0}})), "corrupt checkpoint state"),
    ("tensors-missing", lambda run: _trained(run).unlink(), "is missing; the checkpoint cannot be resumed"),
    ("tensors-truncated", lambda run: _trained(run).write_bytes(_trained(run).read_bytes()[:100]),
     "corrupt checkpoint tensors"),
    ("results-invalid", lambda run: (run / "results.json").write_text("{"), "not valid JSON"),
]


@pytest.mark.parametrize("name, damage, fragment", RUN_DIR_CASES, ids=[c[0] for c in RUN_DIR_CASES])
def test_bad_run_directory_is_refused_and_left_as_it_was(name, damage, fragment, finished_run, tmp_path,
                                                         monkeypatch, capsys):
    run = tmp_path / "done"
    shutil.copytree(finished_run, run)
    damage(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    command = ["report", run] if name.startswith("results") else ["run", "--resume", run, "-q"]
    code, err = cli(monkeypatch, capsys, *command)
    assert_refused(code, err, fragment)
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_an_existing_run_is_not_overwritten(finished_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "done"
    shutil.copytree(finished_run, run)
    cfg = tmp_path / "again.yaml"
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["output_dir"] = str(tmp_path / "runs")
    cfg.write_text(yaml.safe_dump(data))
    before = (run / "results.json").read_bytes()
    code, err = cli(monkeypatch, capsys, "run", cfg, "-q")
    assert_refused(code, err, "already exists; resume it with `retain run --resume")
    assert (run / "results.json").read_bytes() == before
