from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RETAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_rows(kind: str, n: int) -> list[dict]:
    if kind == "upper":
        words = ["cat", "dog", "sun", "sky", "red", "map", "pen", "cup", "hat", "box", "fig", "jam"]
        return [{"input": f"upper {w}", "output": w.upper()} for w in (words * 4)[:n]]
    return [{"input": f"is {i} small?", "output": "yes" if i < 5 else "no", "options": ["yes", "no"]} for i in range(n)]


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write a two-task config on tiny-random and return a function making variants of it."""
    return tiny_configs(tmp_path)


def tiny_configs(tmp_path: Path):
    """``tiny_config`` for any folder (a module-scoped fixture has no ``tmp_path``)."""
    a_train = write_jsonl(tmp_path / "a_train.jsonl", task_rows("upper", 16))
    a_test = write_jsonl(tmp_path / "a_test.jsonl", task_rows("upper", 6))
    b_train = write_jsonl(tmp_path / "b_train.jsonl", task_rows("choice", 10))
    b_test = write_jsonl(tmp_path / "b_test.jsonl", task_rows("choice", 6))

    def make(name: str = "t", **overrides) -> Path:
        cfg = {
            "name": name,
            "model": "tiny-random",
            "strategy": "naive",
            "output_dir": str(tmp_path / "runs"),
            "tasks": [
                {"name": "upper", "train": str(a_train), "test": str(a_test), "metric": "exact_match"},
                {"name": "small", "train": str(b_train), "test": str(b_test), "metric": "choice"},
            ],
            "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2},
            "eval": {"probe_max": 8, "max_new_tokens": 4},
        }
        for key, value in overrides.items():
            node = cfg
            parts = key.split("__")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    return make


#: Small options for every strategy section, so a tiny-random run of any stack takes seconds.
SMALL_OPTIONS = {
    "replay": {"buffer_size": 6, "ratio": 0.5},
    "mir": {"buffer_size": 6, "candidates": 4, "retrieve": 2},
    "tf_ewc": {"window": 2, "plateau_cv": 0.5, "recent": 6, "fisher_samples": 2},
    "tf_lora": {"r": 4, "window": 2, "plateau_cv": 0.5, "max_adapters": 2, "centroid_samples": 4},
    "distill-replay": {"buffer_size": 5, "ratio": 0.5, "top_k": 3},
    "generative_replay": {"samples_per_task": 4, "max_new_tokens": 8},
    "ewc": {"fisher_samples": 3},
    "sparse": {"importance_samples": 4},
    "es": {"population": 2, "max_new_tokens": 2, "sigma": 0.05, "alpha": 0.05},
    "grpo": {"num_generations": 2, "max_completion_length": 2},
    "merge": {"methods": ["linear"]},
    "l2p": {"pool_size": 6, "top_n": 2},
    "lora_experts": {"clusters_per_task": 2},
}


def small_options(spec: str) -> dict:
    """The SMALL_OPTIONS sections the stack ``spec`` uses (other sections would be refused)."""
    from retain.strategies.base import parse_strategy

    keys = {c.options_key for c in parse_strategy(spec) if c.options_key}
    return {k: v for k, v in SMALL_OPTIONS.items() if k in keys}


def run_figures(results: dict) -> dict:
    """What a resumed run must reproduce exactly: scores, metrics, losses, strategy figures
    (timings aside)."""
    def untimed(d):
        if isinstance(d, dict):
            return {k: untimed(v) for k, v in d.items() if "seconds" not in k and not k.endswith("_s")}
        return [untimed(v) for v in d] if isinstance(d, list) else d

    return {
        "R": results["R"], "base": results["base"], "metrics": results["metrics"],
        "probe": results["probe"], "final": results["final"], "routing": results["routing"],
        "losses": [(t["loss_first"], t["loss_last"], t["tokens"]) for t in results["timings"]],
        "stats": untimed(results["strategy_stats"]), "updates": untimed(results["updates"]),
    }


def die_at(monkeypatch, target, attr: str, call: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Make ``target.attr`` raise ``exc`` on its ``call``-th call (a kill at a chosen step);
    ``monkeypatch.undo()`` restores it."""
    real, calls = getattr(target, attr), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, dying)
