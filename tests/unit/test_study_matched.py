"""The study's tables: each arm's update where it first reached a score, and its cost."""

from retain.study import matched_rows, seconds_per_update


def _arm(name: str, base: float, records: list[tuple[int, float, float, float]]) -> dict:
    return {"name": name, "base": [base], "updates": [
        {"global_step": step, "scores": {"t": score}, "norm": {"rel": rel}, "probe": probe}
        for step, score, rel, probe in records]}


def test_each_level_takes_the_first_record_at_or_above_it():
    fast = _arm("fast", 20.0, [(10, 70.0, 1e-4, 99.0), (20, 84.0, 3e-4, 98.5)])
    slow = _arm("slow", 25.0, [(10, 28.0, 3e-3, 100.0), (20, 30.0, 5e-3, 99.5), (30, 48.0, 9e-3, 98.6)])
    header, rows = matched_rows([fast, slow])
    assert header == ["score reached", "fast", "slow"]
    # Levels from above the lowest base (20) to the best score reached (84), every 10 points.
    assert [r[0] for r in rows] == [">= 30", ">= 40", ">= 50", ">= 60", ">= 70", ">= 80"]
    assert rows[0] == [">= 30", "0.0001 at step 10 (score 70, probe 99.0)", "0.005 at step 20 (score 30, probe 99.5)"]
    assert rows[1][2] == "0.009 at step 30 (score 48, probe 98.6)"
    assert rows[2][2] == "not reached"
    assert rows[5][1] == "0.0003 at step 20 (score 84, probe 98.5)"


def test_scores_average_over_tasks_and_no_records_give_no_table():
    two = {"name": "two", "base": [10.0, 30.0], "updates": [
        {"global_step": 5, "scores": {"a": 20.0, "b": 40.0}, "norm": {"rel": 2e-3}, "probe": None}]}
    assert matched_rows([two]) == (["score reached", "two"], [[">= 30", "0.002 at step 5 (score 30, probe n/a)"]])
    assert matched_rows([{"name": "x", "base": [20.0], "updates": []}]) == ([], [])


def test_seconds_per_update_leave_out_the_analysis_inside_the_phases():
    run = {"timings": [{"steps": 10, "train_s": 100.0}, {"steps": 10, "train_s": 60.0}], "updates": [
        {"phase": 0, "step": 5, "seconds": 30.0},   # inside phase 0: part of its train_s
        {"phase": 0, "step": 10, "seconds": 7.0},   # at the phase end: measured after train_s
        {"phase": 1, "step": 5, "seconds": 10.0},
        {"phase": 1, "step": 10, "seconds": 7.0}]}
    assert seconds_per_update(run) == (100.0 - 30.0 + 60.0 - 10.0) / 20
    assert seconds_per_update({"timings": []}) is None
