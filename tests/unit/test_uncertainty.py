"""Intervals, paired comparisons, seeds and example-level forgetting, against hand-computed values."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from retain.errors import RetainError
from retain.evaluation.uncertainty import decode, encode, intervals, paired, percentile, wilson
from retain.metrics import summarize
from retain.reporting.forgotten import transitions


def test_wilson_matches_the_textbook_values():
    lo, hi = wilson(8, 10)
    assert (lo, hi) == pytest.approx((49.016, 94.331), abs=1e-3)  # Wilson 1927; Newcombe 1998 table: 0.4902-0.9433
    assert wilson(0, 6) == pytest.approx((0.0, 100 * 3.8415 / 9.8415), abs=1e-3)  # upper = z^2 / (n + z^2)
    assert wilson(6, 6)[1] == pytest.approx(100.0) and wilson(0, 0) is None


def test_item_records_round_trip():
    assert encode([100.0, 0.0, 100.0]) == "101"
    assert decode("101").tolist() == [100.0, 0.0, 100.0]
    assert encode([12.34567, 100.0]) == [12.346, 100.0] and decode([12.346, 100.0]).tolist() == [12.346, 100.0]


def _results(items: dict[str, list[str]], probe: list[str] | None = None, name: str = "r") -> dict:
    """A results dict of two tasks (evaluations: base, after a, after b) from item strings."""
    tasks = list(items)
    evaluations = []
    for row in range(3):
        record = {t: {"scores": items[t][row], "answers": [0] * len(items[t][row])} for t in tasks}
        if probe:
            record["p"] = {"scores": probe[row], "answers": [0] * len(probe[row])}
        evaluations.append({"items": record})
    mean = lambda s: 100.0 * s.count("1") / len(s)  # noqa: E731
    R = [[mean(items[t][row]) for t in tasks] for row in (1, 2)]
    base = [mean(items[t][0]) for t in tasks]
    out = {"name": name, "tasks": tasks, "R": R, "base": base, "metrics": summarize(R, base),
           "evaluations": evaluations, "item_ids": {t: "x" for t in [*tasks, "p"]},
           "probe": None}
    if probe:
        out["probe"] = {"names": ["p"], "base": mean(probe[0]), "after_phase": [mean(probe[1]), mean(probe[2])],
                        "retention": 100 * mean(probe[2]) / mean(probe[0])}
    return out


ITEMS = {"a": ["0000", "1111", "1100"], "b": ["0010", "0011", "1111"]}


def test_metric_intervals_are_a_bootstrap_over_items_shared_by_the_rows():
    results = _results(ITEMS, probe=["1111", "1110", "1100"])
    ci = intervals(results, reps=500, seed=3)
    # Hand-computed: the same draws, one resample of each task's items used in every row.
    rng = np.random.default_rng(3)
    draws = {t: rng.multinomial(4, [0.25] * 4, size=500) for t in ("a", "b", "p")}
    values = {t: np.array([[100.0 * int(c) for c in s] for s in rows]) for t, rows in {**ITEMS, "p": None}.items()
              if rows is not None}
    values["p"] = np.array([[100.0 * int(c) for c in s] for s in ["1111", "1110", "1100"]])
    aa, bwt, retention = [], [], []
    for k in range(500):
        m = {t: draws[t][k] @ values[t].T / 4 for t in ("a", "b", "p")}
        R = [[m["a"][1], m["b"][1]], [m["a"][2], m["b"][2]]]
        s = summarize(R, [m["a"][0], m["b"][0]])
        aa.append(s["AA"])
        bwt.append(s["BWT"])
        retention.append(100 * m["p"][2] / m["p"][0] if m["p"][0] > 0 else np.nan)
    assert ci["metrics"]["AA"] == pytest.approx(list(np.percentile(aa, [2.5, 97.5])), abs=1e-3)
    assert ci["metrics"]["BWT"] == pytest.approx(list(np.percentile(bwt, [2.5, 97.5])), abs=1e-3)
    assert ci["probe"]["retention"] == pytest.approx(list(percentile(np.array(retention))), abs=1e-3)
    # Accuracy cells: Wilson. Same results, same seed: the same intervals.
    assert ci["R"][1][0] == pytest.approx(list(wilson(2, 4)), abs=1e-3) and ci["base"][0] == pytest.approx(
        list(wilson(0, 4)), abs=1e-3)
    assert intervals(results, reps=500, seed=3) == ci


def test_a_run_paired_with_itself_differs_by_zero_with_p_one():
    results = _results(ITEMS, probe=["1111", "1110", "1100"])
    out = paired([results], [copy.deepcopy(results)], reps=300)
    for key in ("AA", "BWT", "FM", "probe", "probe_retention"):
        d = out["metrics"][key]
        assert d["difference"] == 0 and d["interval"] == [0.0, 0.0] and d["p"] == 1.0 and not d["significant"]


def test_a_clear_difference_is_significant_and_signed():
    better = _results({"a": ["0000" * 10, "1111" * 10, "1111" * 10], "b": ["0000" * 10, "0000" * 10, "1111" * 10]})
    worse = _results({"a": ["0000" * 10, "1111" * 10, "0000" * 10], "b": ["0000" * 10, "0000" * 10, "1111" * 10]})
    d = paired([better], [worse], reps=300)["metrics"]
    assert d["AA"]["difference"] == 50.0 and d["AA"]["significant"] and d["AA"]["p"] < 0.01
    assert d["BWT"]["difference"] == 100.0 and d["BWT"]["interval"][0] > 0


def test_runs_on_other_items_are_not_paired():
    a, b = _results(ITEMS), _results(ITEMS, name="other")
    b["item_ids"]["b"] = "y"
    with pytest.raises(RetainError, match="cannot pair r with other: their test items of 'b' differ"):
        paired([a], [b])


def test_transitions_sort_items_by_what_happened():
    assert transitions("1100", "1010") == {"forgotten": [1], "retained": [0], "learned_later": [2], "never": [3]}


def test_forgotten_examples_match_the_transitions_of_R(tiny_config):
    from retain.config import load_config
    from retain.loop import execute

    r = execute(load_config(tiny_config("f", train__lr=0.05, train__max_steps=4, eval__probe=["piqa"],
                                        eval__probe_max=8)), quiet=True)
    for name, e in r["examples"].items():
        counts = e["counts"]
        if name == "piqa":
            then, end = r["probe"]["suites"]["piqa"]["base"], r["probe"]["suites"]["piqa"]["after_phase"][-1]
        else:
            j = r["tasks"].index(name)
            then, end = r["R"][j][j], r["R"][-1][j]
        n = sum(counts.values())
        assert counts["forgotten"] + counts["retained"] == round(then * n / 100)
        assert counts["retained"] + counts["learned_later"] == round(end * n / 100)
        assert len(e["forgotten"]) == min(counts["forgotten"], 20)
        for row in e["forgotten"]:
            assert row["then"] == row["gold"] and row["end"] != row["gold"] or name == "upper"
    assert set(r["examples"]) >= {"small", "piqa"}


def test_three_seeds_write_the_aggregate_and_resume_the_missing_one(tiny_config, tmp_path):
    import shutil

    from retain.config import load_config
    from retain.seeds import run_seeds

    cfg = load_config(tiny_config("s", seeds=[0, 1, 2], eval__probe=["piqa"], eval__probe_max=6))
    agg = run_seeds(cfg, quiet=True)
    folder = tmp_path / "runs" / "s"
    per_seed = [json.loads((folder / f"seed-{s}" / "results.json").read_text()) for s in (0, 1, 2)]
    assert [r["seed"] for r in per_seed] == [0, 1, 2] and agg["seeds"] == [0, 1, 2]
    aa = [r["metrics"]["AA"] for r in per_seed]
    assert agg["metrics"]["AA"]["per_seed"] == aa and agg["metrics"]["AA"]["mean"] == pytest.approx(np.mean(aa), 1e-4)
    assert agg["metrics"]["AA"]["std"] == pytest.approx(np.std(aa, ddof=1), abs=1e-4)
    lo, hi = agg["metrics"]["AA"]["interval"]
    assert lo <= min(aa) + 1e-9 or lo <= np.mean(aa) <= hi
    assert json.loads((folder / "aggregate.json").read_text()) == agg and (folder / "report.md").is_file()
    # Killed before seed 2 finished: only seed 2 runs again.
    stamp = (folder / "seed-0" / "results.json").stat().st_mtime_ns
    shutil.rmtree(folder / "seed-2")
    again = run_seeds(cfg, resume=True, quiet=True)
    assert (folder / "seed-0" / "results.json").stat().st_mtime_ns == stamp
    assert again["metrics"] == agg["metrics"]


def test_compare_pairs_runs_on_the_same_items(tiny_config, tmp_path):
    from retain.config import load_config
    from retain.loop import execute
    from retain.reporting import compare_runs

    execute(load_config(tiny_config("x", eval__probe=["piqa"], eval__probe_max=6)), quiet=True)
    execute(load_config(tiny_config("y", eval__probe=["piqa"], eval__probe_max=6, train__lr=0.05)), quiet=True)
    execute(load_config(tiny_config("z", eval__probe=["piqa"], eval__probe_max=5)), quiet=True)
    runs = tmp_path / "runs"
    text, _ = compare_runs([runs / "x", runs / "x", runs / "y", runs / "z"], tmp_path / "cmp")
    assert "Paired differences against x" in text
    assert "| x (2) | AA | " in text and "| +0.0 | [+0.0, +0.0] | 1.000 |" in text
    assert "| y | AA |" in text
    assert "cannot pair z with x: their test items of 'piqa' differ" in text
    saved = json.loads((tmp_path / "cmp" / "paired.json").read_text())
    assert saved["x (2)"]["metrics"]["AA"]["p"] == 1.0


def test_a_study_arm_with_seeds_reports_each_seed(tiny_config, tmp_path):
    import yaml

    from retain.study import run_study

    tiny_config("arm", analysis={"enabled": True}, train__max_steps=2, eval__probe=False)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "st", "output_dir": str(tmp_path / "out"),
                                     "arms": [{"config": "arm.yaml", "set": ["seeds=[0,1]"]}]}))
    text = run_study(study, quiet=True).read_text()
    assert "| arm/seed-0 |" in text and "| arm/seed-1 |" in text
    assert (tmp_path / "out" / "st" / "arm" / "aggregate.json").is_file()


def test_the_command_line_runs_seeds_and_resumes_them(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from retain.cli import app

    cfg = tiny_config("cli", eval__probe=False, train__max_steps=2)
    result = CliRunner().invoke(app, ["run", str(cfg), "--seeds", "3,4", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "cli"
    assert "over seeds 3, 4" in result.output and "95% interval (seeds and items)" in result.output
    assert {p.name for p in folder.iterdir()} >= {"seed-3", "seed-4", "aggregate.json", "report.md", "config.yaml"}
    again = CliRunner().invoke(app, ["run", "--resume", str(folder), "--quiet"], catch_exceptions=False)
    assert again.exit_code == 0 and json.loads((folder / "aggregate.json").read_text())["seeds"] == [3, 4]
    (folder / "report.md").unlink()
    report = CliRunner().invoke(app, ["report", str(folder)], catch_exceptions=False)
    assert report.exit_code == 0 and (folder / "report.md").read_text().startswith("# cli over seeds 3, 4")


def test_a_value_that_rounds_to_zero_is_printed_without_a_minus_sign():
    from retain.reporting.report import fmt

    assert fmt(-1e-15) == "0.0" and fmt(-0.0, signed=True) == "+0.0"
    assert fmt(-0.04) == "0.0" and fmt(-0.06) == "-0.1" and fmt(2.25, 1, signed=True) == "+2.2"
