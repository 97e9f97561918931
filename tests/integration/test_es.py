"""ES and the update analysis inside real runs on tiny-random."""

import json
from pathlib import Path

import pytest
import torch

from retain.config import load_config
from retain.errors import RetainError
from retain.loop import execute
from retain.strategies.lora import LoraOptions  # noqa: F401 - registers lora

ES = {"population": 4, "sigma": 0.05, "alpha": 0.05, "max_new_tokens": 3}


def test_es_run_writes_the_same_schema_as_gradient_runs_and_records_updates(tiny_config, tmp_path):
    analysis = {"enabled": True, "every": 1, "kl_prompts": 4, "probe": True, "tasks": True}
    es = execute(load_config(tiny_config("es", strategy="es", es=ES, analysis=analysis, train__max_steps=2)),
                 quiet=True)
    sft = execute(load_config(tiny_config("sft", strategy="naive", analysis=analysis, train__max_steps=2)),
                  quiet=True)
    assert set(es) == set(sft)
    assert es["strategy_stats"][0]["es"]["iterations"] == 2
    assert es["timings"][0]["steps"] == 2 and es["timings"][0]["tokens"] > 0
    for results in (es, sft):
        steps = [u["global_step"] for u in results["updates"]]
        assert steps == [1, 2, 3, 4]  # every step, phase ends included, numbered through the stream
        last = results["updates"][-1]
        assert last["norm"]["abs"] > 0 and last["kl_base"] >= 0
        assert last["probe"] == pytest.approx(results["probe"]["after_phase"][-1], abs=1e-4)
        assert 0 < last["density"]["fp32"]["1e-06"] <= 1
        assert last["scores"] == pytest.approx(dict(zip(results["tasks"], results["R"][-1])), abs=1e-3)
        assert set(results["updates"][0]["scores"]) == set(results["tasks"])  # in-phase: scored by the tracker
    # ES moves every weight (dense noise); the report shows the analysis.
    assert es["updates"][-1]["density"]["fp32"]["1e-06"] > 0.99
    report = (tmp_path / "runs" / "es" / "report.md").read_text()
    assert "Update analysis" in report and (tmp_path / "runs" / "es" / "plots" / "updates.png").is_file()
    saved = json.loads((tmp_path / "runs" / "es" / "results.json").read_text())
    assert saved["updates"] == es["updates"]


def test_lora_es_moves_only_adapter_weights(tiny_config, tmp_path):
    from retain.loop import restore

    # LoRA's B starts at zero: only a large sigma moves the answers enough to rank members.
    es = {**ES, "sigma": 2.0, "population": 6}
    cfg = load_config(tiny_config("lora-es", strategy="lora+es", es=es, train__max_steps=2))
    results = execute(cfg, quiet=True)
    stats = [s["es"] for s in results["strategy_stats"]]
    assert any(s["flat_iterations"] < s["iterations"] for s in stats)
    ctx, _ = restore(tmp_path / "runs" / "lora-es")
    from retain.models import load_model

    base, _ = load_model("tiny-random", seed=cfg.seed)
    base_state = base.state_dict()
    for name, p in ctx.model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.cpu(), base_state[key]), name


def test_es_with_replay_rewards_members_on_the_earlier_task_too(tiny_config, monkeypatch):
    from retain.strategies.es import ES as ESStrategy

    seen: list[tuple[int, set[str]]] = []
    real = ESStrategy.population_rewards

    def recording(self, ctx, items, members, params):
        seen.append((ctx.phase, {it.task for it in items}))
        return real(self, ctx, items, members, params)

    monkeypatch.setattr(ESStrategy, "population_rewards", recording)
    cfg = load_config(tiny_config("es-replay", strategy="es+replay", es=ES, replay={"ratio": 0.5},
                                  train__max_steps=3))
    results = execute(cfg, quiet=True)
    # Phase 0 sees only its own task; every phase-1 batch carries replayed 'upper' prompts.
    assert [tasks for phase, tasks in seen if phase == 0] == [{"upper"}] * 3
    assert [tasks for phase, tasks in seen if phase == 1] == [{"upper", "small"}] * 3
    assert results["strategy_stats"][1]["replay"]["memory_examples"] > 0


def test_es_refuses_perplexity_tasks(tmp_path):
    from retain.errors import RetainError

    cfg = load_config_from({"name": "x", "model": "tiny-random", "stream": "domains", "strategy": "es",
                            "output_dir": str(tmp_path)})
    with pytest.raises(RetainError, match="perplexity"):
        execute(cfg, quiet=True)
    assert not (tmp_path / "x").exists()


def load_config_from(data):
    from retain.config import validate_config

    return validate_config(data)


def _parallel_equals_serial(tiny_config, tmp_path, **parallel):
    from retain.loop import restore

    runs = {}
    for name, extra in (("serial", {"workers": 1}), ("parallel", {"workers": 2, **parallel})):
        cfg = load_config(tiny_config(name, strategy="es", es={**ES, **extra}, train__max_steps=2))
        runs[name] = execute(cfg, quiet=True)
        ctx, _ = restore(tmp_path / "runs" / name)
        runs[name]["weights"] = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    serial, par = runs["serial"], runs["parallel"]
    assert serial["R"] == par["R"]
    assert [s["es"]["reward_last"] for s in serial["strategy_stats"]] == \
        [s["es"]["reward_last"] for s in par["strategy_stats"]]
    assert any(s["es"]["flat_iterations"] < s["es"]["iterations"] for s in serial["strategy_stats"])
    for n, p in serial["weights"].items():
        assert torch.equal(p, par["weights"][n]), n


def test_parallel_workers_give_the_serial_result(tiny_config, tmp_path):
    _parallel_equals_serial(tiny_config, tmp_path)


@pytest.mark.xdist_group("distributed")
def test_ray_actors_on_two_nodes_give_the_serial_result(tiny_config, tmp_path):
    """The cluster path (es.ray_address): two Ray nodes of one CPU each, so the two actors
    cannot share a node and the weights and seeds cross between nodes' object stores. (A local
    Ray differs only in ``ray.init``'s arguments; one Ray test keeps the suite's time down.)"""
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'retain[ray]')")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        _parallel_equals_serial(tiny_config, tmp_path, backend="ray", ray_address=cluster.address)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and all(n["Resources"].get("CPU") == 1 for n in nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_backend_without_ray_says_how_to_get_it(monkeypatch):
    import builtins

    from retain.strategies.es.pools import RayPool

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name, *a, **k))
    with pytest.raises(RuntimeError, match="pip install 'ray>=2.9'"):
        RayPool(2, {}, [])


def test_grpo_trains_through_trl_and_writes_the_same_schema(tiny_config, tmp_path, capsys):
    analysis = {"enabled": True, "every": 1, "kl_prompts": 4}
    # Four samples per prompt, rewarded for containing a letter: about half do, so the rewards of a
    # group differ (and the policy gets a gradient) whatever the device's random draws.
    grpo = execute(load_config(tiny_config("grpo", strategy="grpo", analysis=analysis, train__max_steps=2,
                                           train__lr=1e-2, train__batch_size=8,
                                           grpo={"num_generations": 4, "max_completion_length": 4, "format_weight": 1.0,
                                                 "format_pattern": ".*[A-Za-z].*"})), quiet=True)
    assert "'grad_norm'" not in capsys.readouterr().out  # TRL's log dicts are not printed, the loop reports
    sft = execute(load_config(tiny_config("sft", strategy="naive", train__max_steps=2)), quiet=True)
    assert set(grpo) == set(sft)
    assert [t["steps"] for t in grpo["timings"]] == [2, 2] and grpo["timings"][0]["tokens"] > 0
    assert [u["global_step"] for u in grpo["updates"]] == [1, 2, 3, 4]
    assert grpo["updates"][-1]["norm"]["abs"] > 0  # the policy moved
    assert grpo["strategy_stats"][0]["grpo"]["reward_last"] is not None


def test_grpo_refuses_a_batch_that_does_not_hold_whole_groups(tiny_config, tmp_path):
    from retain.errors import RetainError

    with pytest.raises(RetainError, match="multiple of grpo.num_generations"):
        execute(load_config(tiny_config("g", strategy="grpo", train__batch_size=3)), quiet=True)
    assert not (tmp_path / "runs" / "g").exists()


def test_study_runs_each_arm_once_and_reports_them_side_by_side(tiny_config, tmp_path):
    import yaml

    from retain.errors import RetainError
    from retain.study import run_study

    analysis = {"enabled": True, "every": 1, "tasks": True, "probe": True, "kl_prompts": 2}
    tiny_config("sft", analysis=analysis, train__max_steps=2)
    tiny_config("es", strategy="es", es=ES, analysis=analysis, train__max_steps=2)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "out"), "arms": [
        "sft.yaml", "es.yaml", {"config": "es.yaml", "name": "es-sparse", "set": ["es.top_fraction=0.1"]}]}))
    report = run_study(study, quiet=True)
    text = report.read_text()
    for arm in ("sft", "es", "es-sparse"):
        assert f"| {arm} |" in text
        assert (tmp_path / "out" / "s" / arm / "results.json").is_file()
    assert (tmp_path / "out" / "s" / "study.png").is_file()
    stamp = (tmp_path / "out" / "s" / "es" / "results.json").stat().st_mtime_ns
    shared = tmp_path / "shared"
    run_study(study, quiet=True, export=shared)  # finished arms are not run again
    assert (tmp_path / "out" / "s" / "es" / "results.json").stat().st_mtime_ns == stamp
    # The export: report, plot and each arm's results, the report's links pointing at the copies.
    assert sorted(f.name for f in shared.iterdir()) == ["es-sparse.json", "es.json", "sft.json", "study.md", "study.png"]
    assert (shared / "es.json").read_bytes() == (tmp_path / "out" / "s" / "es" / "results.json").read_bytes()
    exported = (shared / "study.md").read_text()
    assert "[es-sparse](es-sparse.json)" in exported and "report.md" not in exported
    assert exported.split("![study]")[0] == text.split("![study]")[0]
    with pytest.raises(RetainError, match="the study's own folder"):
        run_study(study, quiet=True, export=tmp_path / "out" / "s")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(RetainError, match="taken: a file is there"):
        run_study(study, quiet=True, export=tmp_path / "taken")
    # Other settings for the same arms: refused before anything runs, nothing replaced.

    with pytest.raises(RetainError, match=r"out/s/sft holds arm 'sft' run with train.max_steps=2, but the study "
                                          r"now asks train.max_steps=5.*delete or move that folder"):
        run_study(study, quiet=True, overrides=["train.max_steps=5"])
    assert (tmp_path / "out" / "s" / "es" / "results.json").stat().st_mtime_ns == stamp


def test_study_refuses_arms_without_the_analysis_or_with_one_name(tiny_config, tmp_path):
    import yaml

    from retain.errors import RetainError
    from retain.study import load_study

    tiny_config("plain")
    tiny_config("a", analysis={"enabled": True})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "arms": ["plain.yaml"]}))
    with pytest.raises(RetainError, match=r"arms\[0\] \(plain\).*analysis.enabled"):
        load_study(study)
    study.write_text(yaml.safe_dump({"name": "s", "arms": ["a.yaml", "a.yaml"]}))
    with pytest.raises(RetainError, match="two arms are named 'a'"):
        load_study(study)
    study.write_text(yaml.safe_dump({"name": "s", "arms": [], "extra": 1}))
    with pytest.raises(RetainError, match="study.yaml"):
        load_study(study)
    study.write_text(yaml.safe_dump({"name": "s", "arms": [{"config": "a.yaml", "set": ["train.max_steps=3"]}]}))
    _, (cfg,) = load_study(study, ["train.max_steps=7", "seed=5"])  # every arm, after its own set
    assert (cfg.train.max_steps, cfg.seed) == (7, 5)
    # The study's own set reaches every arm; an arm's set and the command line win over it.
    study.write_text(yaml.safe_dump({"name": "s", "set": ["train.max_steps=4", "seed=2", "train.lr=0.5"], "arms": [
        {"config": "a.yaml", "set": ["train.max_steps=3"]}, {"config": "a.yaml", "name": "b"}]}))
    _, (a, b) = load_study(study, ["train.lr=0.25"])
    assert (a.train.max_steps, a.seed, a.train.lr) == (3, 2, 0.25)
    assert (b.train.max_steps, b.seed, b.train.lr) == (4, 2, 0.25)
    # Another name: the arms go to another folder.
    renamed, (a, _) = load_study(study, name="s-short")
    assert renamed.name == "s-short" and Path(a.output_dir).name == "s-short"
    with pytest.raises(RetainError, match="study name 'a/b'"):
        load_study(study, name="a/b")
    study.write_text(yaml.safe_dump({"name": "s", "set": ["train.nonsense=1"], "arms": ["a.yaml"]}))
    with pytest.raises(RetainError, match=r"study.yaml: arms\[0\]: .*a.yaml: 'train.nonsense': unknown key"):
        load_study(study)


def test_grpo_stops_with_a_clear_error_on_a_nan_gradient(tiny_config, monkeypatch):
    import transformers

    real_log = transformers.Trainer.log

    def nan_log(self, logs, *args, **kwargs):  # what TRL logs when a bf16 step on CUDA goes NaN
        return real_log(self, {**logs, "grad_norm": float("nan")} if "loss" in logs else logs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "log", nan_log)
    cfg = load_config(tiny_config("grpo-nan", strategy="grpo", train__max_steps=2,
                                  grpo={"num_generations": 2, "max_completion_length": 4}))
    with pytest.raises(RetainError, match="gradient is NaN at step 1 of phase 0"):
        execute(cfg, quiet=True)
    assert not (Path(cfg.output_dir) / "grpo-nan" / "results.json").exists()
