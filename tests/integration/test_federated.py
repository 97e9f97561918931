"""Federated continual learning on Flower's simulation engine (``federated:``)."""

from __future__ import annotations

import pytest
import torch
import yaml

from retain.config import load_config
from retain.errors import RetainError

pytest.importorskip("flwr", reason="federated is an extra: pip install 'retain[federated]'")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray: pip install 'retain[federated]'")
# Ray and Flower start clusters and servers: one xdist worker runs them, one after another.
pytestmark = pytest.mark.xdist_group("distributed")


def federated_config(tiny_config, name="fl", **over):
    base = dict(strategy="lora+replay", replay={"buffer_size": 6, "ratio": 0.5},
                federated={"clients": 2, "rounds": 1, "local_steps": 2}, eval={"probe": False, "max_new_tokens": 4})
    return tiny_config(name, **{**base, **over})


def test_federated_run_averages_the_clients_adapters_and_survives_a_lost_client(tiny_config, tmp_path,
                                                                                 monkeypatch):
    """Two clients, two rounds of one task; client 1 fails in round 2. Round 1's global adapter
    must be the example-weighted mean of the clients' adapters (recomputed here, in-process, by
    the same client code), and round 2's exactly what client 0 sent. (One task keeps this to one
    Flower run: each starts Ray; phases are separate runs of the same code.)"""
    from retain.federated import DROP_ENV, _client, adapter, train_client
    from retain.loop import execute, restore

    monkeypatch.setenv(DROP_ENV, "1:1:2")
    task = yaml.safe_load(tiny_config("probe-tasks").read_text())["tasks"][0]
    path = federated_config(tiny_config, tasks=[task], federated={"clients": 2, "rounds": 2, "local_steps": 2})
    results = execute(load_config(path), quiet=True)
    fed = results["federated"]
    assert len(results["R"]) == 1 and results["phases"] == [["upper"]]
    (phase,) = fed["phases"]
    first, second = phase["rounds"]
    assert [c["client"] for c in first["clients"]] == [0, 1]
    assert [c["client"] for c in second["clients"]] == [0]  # client 1 was lost
    # Disjoint shards: 16 training examples split between two clients.
    assert [c["examples"] for c in first["clients"]] == [8, 8]
    assert phase["bytes_per_round"] == [2 * phase["adapter_bytes"] * 2, 2 * phase["adapter_bytes"] * 1]
    # Only client 0 answered the last round, which asks each client to score its own model.
    assert list(fed["client_R"]) == ["0"] and len(fed["client_R"]["0"]) == 1
    report = (tmp_path / "runs" / "fl" / "report.md").read_text()
    assert "## Federated" in report and "| upper | 2 | 2 / 1 |" in report

    # The same rounds in this process.
    config = load_config(path)
    text = yaml.safe_dump(config.resolved(), sort_keys=False)
    initial = adapter(_client(text, 0)[0].model)
    a0, r0 = train_client(text, 0, 0, 1, initial, {}, 0.0, False)
    a1, _ = train_client(text, 1, 0, 1, initial, {}, 0.0, False)
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)  # the clients did train apart
    mean = {k: (8 * a0[k] + 8 * a1[k]) / 16 for k in a0}
    # Client 0's replay memory from round 1 travelled back to it in round 2.
    state = yaml.safe_load(r0["state"])
    assert state["replay"]["records"]
    last, _ = train_client(text, 0, 0, 2, mean, state, 0.0, False)
    ctx, _ = restore(tmp_path / "runs" / "fl")
    final = {n: p.detach() for n, p in ctx.model.named_parameters() if "lora_" in n}
    assert final.keys() == last.keys()
    for k in final:
        torch.testing.assert_close(final[k], last[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("over,fragment", [
    (dict(strategy="naive"), "must own LoRA weights through 'lora'"),
    (dict(strategy="lora+ewc"), "'ewc' keeps state a client cannot carry"),
    (dict(online={}), "online mode"),
    (dict(privacy={"epsilon": 4, "delta": 1e-3}), "record-level DP-SGD on the clients"),
    (dict(federated={"clients": 12}), "task 'small' has fewer training examples than clients"),
])
def test_what_a_federated_run_would_not_do_is_refused(tiny_config, over, fragment):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=fragment):
        check_run(load_config(federated_config(tiny_config, **over)))


def test_client_level_dp_clips_each_update_and_reports_its_epsilon(tiny_config, tmp_path):
    """A clipping norm far below the clients' update norms and negligible noise: the global
    adapter moves by at most the clipping norm, and epsilon is Opacus's for the rounds."""
    from opacus.accountants import create_accountant

    from retain.federated import _client, adapter
    from retain.loop import execute, restore

    task = yaml.safe_load(tiny_config("probe-tasks").read_text())["tasks"][0]
    path = federated_config(tiny_config, "fldp", strategy="lora", tasks=[task], train__lr=0.05, federated={
        "clients": 2, "rounds": 1, "local_steps": 3, "dp": {"noise_multiplier": 1e-6, "clipping_norm": 1e-3}})
    results = execute(load_config(path), quiet=True)
    dp = results["federated"]["dp"]
    acc = create_accountant("rdp")
    acc.history = [(1e-6, 1.0, 1)]
    assert dp["releases"] == 1 and dp["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-3)
    assert results["metrics"]["epsilon"] == dp["epsilon"]
    text = yaml.safe_dump(load_config(path).resolved(), sort_keys=False)
    initial = adapter(_client(text, 0)[0].model)
    ctx, _ = restore(tmp_path / "runs" / "fldp")
    final = {n: p.detach() for n, p in ctx.model.named_parameters() if "lora_" in n}
    moved = torch.sqrt(sum(((final[k] - initial[k]) ** 2).sum() for k in final))
    assert 0 < moved <= 1e-3 * 1.01
    assert "Client-level DP" in (tmp_path / "runs" / "fldp" / "report.md").read_text()


def test_fedprox_term_is_half_mu_times_the_squared_distance_to_the_global_adapter():
    from peft import LoraConfig, get_peft_model

    from retain.federated import Proximal, adapter
    from retain.models import load_model
    from retain.strategies.base import Context

    model, tok = load_model("tiny-random", seed=0)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    anchor = {k: v + 0.1 for k, v in adapter(model).items()}
    numel = sum(v.numel() for v in anchor.values())
    ctx = Context(config=None, model=model, tokenizer=tok, accelerator=None, stream=None)
    term = Proximal(0.5, anchor).extra_loss(ctx, None, None, [])
    assert term.item() == pytest.approx(0.5 * 0.5 * 0.01 * numel, rel=1e-4)
    term.backward()  # it pulls the adapter toward the global one
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert Proximal(0.0, anchor).extra_loss(ctx, None, None, []) is None


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_for_port(port: int, proc, log, timeout: float = 90.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flower-superlink exited: {log.read_text()[-800:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"flower-superlink did not listen on {port} within {timeout:.0f} s")


def test_deployment_engine_runs_on_a_real_superlink_and_supernodes(tiny_config, tmp_path):
    """A SuperLink and two SuperNodes as separate processes on localhost; each phase is a
    Flower App run submitted with `flwr run`."""
    import subprocess
    import sys
    from pathlib import Path

    from retain.loop import execute

    bin_dir = Path(sys.executable).parent
    link, node0, node1 = _free_ports(3)
    logs = tmp_path / "flower"
    logs.mkdir()
    import os

    # The SuperLink and SuperNodes start Flower's own helper processes by name, from PATH.
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmds = [[str(bin_dir / "flower-superlink"), "--insecure", "--port", str(link),
             "--database", str(tmp_path / "link.db")]]
    cmds += [[str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(p),
              "--node-config", f"partition-id={i} num-partitions=2"] for i, p in enumerate((node0, node1))]
    procs = []
    try:
        for i, cmd in enumerate(cmds):
            procs.append(subprocess.Popen(cmd, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT,
                                          env=env, cwd=tmp_path))
            if i == 0:  # the SuperNodes and `flwr run` need the SuperLink listening
                _wait_for_port(link, procs[0], logs / "0.log")
        task = yaml.safe_load(tiny_config("probe-tasks").read_text())["tasks"][0]
        path = federated_config(tiny_config, "dep", tasks=[task], federated={
            "clients": 2, "rounds": 1, "local_steps": 2, "engine": "deployment",
            "superlink": f"127.0.0.1:{link}", "insecure": True})
        results = execute(load_config(path), quiet=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    (phase,) = results["federated"]["phases"]
    assert [c["client"] for c in phase["rounds"][0]["clients"]] == [0, 1]
    assert [c["examples"] for c in phase["rounds"][0]["clients"]] == [8, 8]
    assert results["timings"][0]["federated"]["engine"] == "deployment"
    work = tmp_path / "runs" / "dep" / "federated" / "phase-1"
    assert (work / "global.safetensors").is_file() and (work / "flwr.log").is_file()


def test_deployment_engine_needs_tls_or_an_explicit_insecure(tiny_config):
    with pytest.raises(RetainError, match="root_certificates .* or insecure: true"):
        load_config(federated_config(tiny_config, federated={"engine": "deployment"}))
