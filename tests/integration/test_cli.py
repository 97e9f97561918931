"""The command line end to end on tiny-random, and every bad input it must refuse cleanly."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from retain.cli import app

runner = CliRunner()


def invoke(*args):
    from retain.cli import quiet_libraries

    quiet_libraries()
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def cli_error(*args) -> subprocess.CompletedProcess:
    """Run the real console entry point (exit code and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "retain.cli", *map(str, args)], capture_output=True, text=True)


def test_run_writes_a_complete_run_directory(tiny_config, tmp_path):
    result = invoke("run", tiny_config("full", strategy="lora-per-task"), "--quiet")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "full"
    for name in ("config.yaml", "results.json", "report.md", "report.html", "plots/accuracy_matrix.png",
                 "plots/curves.png", "adapters/upper/adapter_model.safetensors",
                 "adapters/small/adapter_config.json", "checkpoints/state.json"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert len(results["R"]) == 2 and len(results["R"][0]) == 2 and len(results["base"]) == 2
    assert results["metrics"]["BWT"] == 0.0  # adapters are isolated: scores cannot move
    assert results["probe"]["base"] is not None and len(results["probe"]["after_phase"]) == 2
    assert results["timings"][0]["tokens_per_s"] > 0 and results["peak_memory_mb"] > 0
    assert results["precision"] == "no"  # fp32, recorded so runs of other precisions are not mixed unmarked
    assert "report:" in result.output and "AA" in result.output
    assert "data:image/png;base64" in (run / "report.html").read_text()


def test_report_compare_generate_list_validate(tiny_config, tmp_path):
    assert invoke("run", tiny_config("a", strategy="lora"), "-q").exit_code == 0
    assert invoke("run", tiny_config("b", strategy="lora-per-task"), "-q").exit_code == 0
    runs = tmp_path / "runs"
    (runs / "a" / "report.md").unlink()
    result = invoke("report", runs / "a")
    assert result.exit_code == 0 and (runs / "a" / "report.md").is_file()
    result = invoke("compare", runs / "a", runs / "b", "--out", tmp_path / "cmp")
    assert result.exit_code == 0 and "| a | lora |" in result.output
    assert (tmp_path / "cmp" / "compare.png").is_file()
    result = invoke("generate", runs / "b", "upper cat", "--task", "upper", "--max-new-tokens", "3")
    assert result.exit_code == 0
    assert (runs / "a" / "adapters" / "lora" / "adapter_model.safetensors").is_file()
    result = invoke("list")
    assert all(s in result.output for s in ("lora-per-task", "replay", "joint", "tiny-random", "numbers"))
    result = invoke("validate", tiny_config("v"))
    assert result.exit_code == 0 and "task     upper: 16 train, 6 test" in result.output
    result = invoke("validate", tiny_config("p2", strategy="lora+replay", privacy={"epsilon": 4, "delta": 1e-3}))
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "privacy DP-SGD, epsilon 4 per phase, delta 0.001" in text
    result = invoke("validate", tiny_config("f", strategy="lora+replay", federated={"clients": 2, "rounds": 3}))
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "federated 2 clients (simulated on Ray), 3 rounds x 10 local steps" in text


def test_generate_answers_with_the_trained_weights(tiny_config, tmp_path):
    """A naive run's generate must use the fine-tuned weights, not the base model."""
    cfg = tiny_config("g", train__max_steps=40)
    assert invoke("run", cfg, "-q").exit_code == 0
    out = invoke("generate", tmp_path / "runs" / "g", "upper cat", "--task", "upper", "--max-new-tokens", "4")
    from retain.models import load_model
    from retain.evaluation import generate

    model, tok = load_model("tiny-random")
    base_answer = generate(model, tok, ["upper cat"], max_new_tokens=4)[0].strip()
    assert out.exit_code == 0 and out.output.strip() != base_answer


def test_bad_data_exits_nonzero_names_line_and_writes_nothing(tiny_config, tmp_path):
    cfg = tiny_config("bad")
    (tmp_path / "b_test.jsonl").write_text('{"input": "x", "output": "yes", "options": ["yes", "no"]}\nnot json\n')
    proc = cli_error("run", cfg, "-q")
    assert proc.returncode == 2 and "b_test.jsonl:2: invalid JSON" in proc.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "b_test.jsonl").write_text("")
    proc = cli_error("validate", cfg)
    assert proc.returncode == 2 and "task 'small': test data" in proc.stderr and "has no examples" in proc.stderr


def test_existing_run_is_not_overwritten_by_accident(tiny_config, tmp_path):
    cfg = tiny_config("once")
    assert invoke("run", cfg, "-q").exit_code == 0
    before = (tmp_path / "runs" / "once" / "results.json").read_text()
    proc = cli_error("run", cfg, "-q")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (tmp_path / "runs" / "once" / "results.json").read_text() == before


def test_help_explains_commands():
    result = invoke("--help")
    for cmd in ("run", "report", "compare", "list", "generate", "validate"):
        assert cmd in result.output
    assert "--resume" in invoke("run", "--help").output


def test_continual_pretraining_on_raw_text(tmp_path):
    """The built-in domains stream end to end: perplexity scores, rewarm+mix, a report."""
    import yaml

    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "cpt", "model": "tiny-random", "stream": "domains", "strategy": "rewarm+mix",
        "output_dir": str(tmp_path / "runs"), "train": {"max_steps": 2, "batch_size": 4, "max_length": 64},
        "eval": {"max_test": 3, "probe": False},
    }))
    result = invoke("run", cfg, "-q")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "runs" / "cpt" / "results.json").read_text())
    assert results["task_metrics"] == {"recipes": "perplexity", "weather": "perplexity", "football": "perplexity"}
    assert all(v > 1 for row in results["R"] for v in row) and results["probe"] is None


def test_raw_text_file_task_has_no_answer_prefix(tmp_path):
    from retain.config import TaskSpec
    from retain.streams import load_task

    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n')
    spec = TaskSpec(name="raw", train=str(tmp_path / "t.jsonl"), test=str(tmp_path / "t.jsonl"),
                    metric="perplexity", output_field="text")
    task = load_task(spec)
    assert task.target(task.test[0].output) == "hello world" and task.test[0].input == ""


def test_validate_runs_every_strategy_check_without_loading_the_model(tiny_config, monkeypatch):
    import retain.loop
    from retain.config import load_config
    from retain.errors import RetainError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(retain.loop, "load_model", no_model)
    cfg = tiny_config("sp", strategy="sparse", train__weight_decay=0.1)
    with pytest.raises(RetainError, match="sparse needs train.weight_decay: 0"):
        retain.loop.prepare(load_config(cfg), __import__("retain.ui").ui.UI(quiet=True))
    result = runner.invoke(app, ["validate", str(cfg)])
    assert isinstance(result.exception, RetainError) and "weight_decay" in str(result.exception)


def test_list_strategy_prints_options_ranges_and_refusals():
    result = invoke("list", "ewc")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for fragment in ("lambda", "100.0", ">= 0", "fisher_samples", "penalty strength", "cannot be combined with",
                     "es replaces the gradient step", "task-free (online:): no",
                     "privacy: refused: its Fisher information is estimated from private examples"):
        assert fragment in text, fragment
    assert "privacy: covered by DP-SGD" in " ".join(invoke("list", "lora").output.split())
    assert "data-parallel (torchrun / accelerate launch): yes" in text
    assert "sharded (train.sharding: zero2 / zero3): yes" in text
    assert "sharded (train.sharding: zero2 / zero3): refused: it snapshots the whole model" in " ".join(
        invoke("list", "lwf").output.split())
    assert "data-parallel (torchrun / accelerate launch): refused: its key-matching loss" in " ".join(
        invoke("list", "l2p").output.split())
    assert "exact | countdown" in " ".join(invoke("list", "es").output.split())
