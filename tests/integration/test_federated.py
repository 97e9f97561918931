"""Federated continual learning on Flower's simulation engine (``federated:``)."""

from __future__ import annotations

import pytest
import torch
import yaml

from retain.config import load_config
from retain.errors import RetainError

pytest.importorskip("flwr", reason="federated is an extra: pip install 'retain[federated]'")
pytest.importorskip("ray", reason="Flower's simulation engine runs on Ray: pip install 'retain[federated]'")


def federated_config(tiny_config, name="fl", **over):
    base = dict(strategy="lora+replay", replay={"buffer_size": 6, "ratio": 0.5},
                federated={"clients": 2, "rounds": 1, "local_steps": 2}, eval={"probe": False, "max_new_tokens": 4})
    return tiny_config(name, **{**base, **over})


def test_federated_run_averages_the_clients_adapters_and_survives_a_lost_client(tiny_config, tmp_path,
                                                                                 monkeypatch):
    """Two clients, two tasks, one round each; client 1 fails in phase 2. Phase 1's global adapter
    must be the example-weighted mean of the clients' adapters (recomputed here, in-process, by
    the same client code), and phase 2's global adapter exactly client 0's."""
    from retain.federated import DROP_ENV, _client, adapter, train_client
    from retain.loop import execute, restore

    monkeypatch.setenv(DROP_ENV, "1:2:1")
    path = federated_config(tiny_config)
    results = execute(load_config(path), quiet=True)
    fed = results["federated"]
    assert len(results["R"]) == 2 and results["phases"] == [["upper"], ["small"]]
    first, second = fed["phases"]
    assert [c["client"] for c in first["rounds"][0]["clients"]] == [0, 1]
    assert [c["client"] for c in second["rounds"][0]["clients"]] == [0]  # client 1 was lost
    # Disjoint shards: 16 and 10 training examples split between two clients.
    assert [c["examples"] for c in first["rounds"][0]["clients"]] == [8, 8]
    assert first["bytes_per_round"] == [2 * first["adapter_bytes"] * 2]
    assert second["bytes_per_round"] == [2 * second["adapter_bytes"] * 1]
    # Client 0 scored its own model after both phases; client 1 only after phase 1.
    assert len(fed["client_R"]["0"]) == 2 and len(fed["client_R"]["1"]) == 1
    report = (tmp_path / "runs" / "fl" / "report.md").read_text()
    assert "## Federated" in report and "| upper | 1 | 2 |" in report and "| small | 1 | 1 |" in report

    # The same rounds in this process.
    config = load_config(path)
    text = yaml.safe_dump(config.resolved(), sort_keys=False)
    initial = adapter(_client(text, 0)[0].model)
    a0, r0 = train_client(text, 0, 0, 1, initial, {}, 0.0, False)
    a1, _ = train_client(text, 1, 0, 1, initial, {}, 0.0, False)
    mean = {k: (8 * a0[k] + 8 * a1[k]) / 16 for k in a0}
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)  # the clients did train apart
    last, _ = train_client(text, 0, 1, 1, mean, yaml.safe_load(r0["state"]), 0.0, False)
    ctx, _ = restore(tmp_path / "runs" / "fl")
    final = {n: p.detach() for n, p in ctx.model.named_parameters() if "lora_" in n}
    assert final.keys() == last.keys()
    for k in final:
        torch.testing.assert_close(final[k], last[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("over,fragment", [
    (dict(strategy="naive"), "must own LoRA weights through 'lora'"),
    (dict(strategy="lora+ewc"), "'ewc' keeps state a client cannot carry"),
    (dict(online={}), "online mode"),
    (dict(federated={"clients": 12}), "task 'small' has fewer training examples than clients"),
])
def test_what_a_federated_run_would_not_do_is_refused(tiny_config, over, fragment):
    from retain.loop import check_run

    with pytest.raises(RetainError, match=fragment):
        check_run(load_config(federated_config(tiny_config, **over)))
