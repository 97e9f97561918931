"""Federated continual learning on Flower: K clients, each with its own shard of every task.

Each phase of the stream is a Flower run (its simulation engine, one virtual SuperNode per
client; or its deployment engine, see ``federated_deploy``):
``federated.rounds`` rounds in which every client loads the global LoRA adapter, trains
``federated.local_steps`` steps on its shard through retain's own loop (its strategy stack,
e.g. a replay memory of its own), and sends its adapter back; the server averages them
weighted by the clients' examples (Flower's FedAvg, or FedProx, whose proximal term the
clients add to their loss). Only the adapter travels; the base model never leaves a client.
After the phase the global model is scored as usual (the run's R), and each client scores
its own last local model (``federated.client_R``).

Clients keep nothing between Flower runs: their strategies' state (a replay memory) comes
back with their reply and goes out again with the next round's message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import TYPE_CHECKING, Any

import torch
import yaml

from retain.errors import RetainError
from retain.strategies.base import Context, Strategy

if TYPE_CHECKING:
    from retain.config import RunConfig
    from retain.strategies import StrategyStack
    from retain.streams import Stream, Task

EXTRA = "pip install 'retain[federated]'"
#: Methods a client can run between rounds: the adapter owner and companions whose whole
#: state is JSON (it travels in the messages).
CLIENT_STRATEGIES = {"lora": "owner", "replay": "companion"}
#: Fault drill: ``client:phase:round`` (e.g. ``1:2:1``: client 1, counted from 0 as in results.json, fails
#: in round 1 of phase 2) - to see that a client lost mid-round leaves the global adapter intact. Read
#: where the server runs and sent to the clients in each round's message: a client's process (a Ray
#: worker of a cluster started earlier, a SuperNode elsewhere) need not share the server's environment.
DROP_ENV = "RETAIN_FEDERATED_DROP"


def require_flower(engine: str = "simulation") -> None:
    needs = ["flwr"] + (["ray"] if engine == "simulation" else [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise RetainError(f"federated: runs on Flower ({', '.join(needs)} for its {engine} engine); "
                          f"{missing[0]} is not installed ({EXTRA})")


def check(config: "RunConfig", stream: "Stream", stack: "StrategyStack") -> None:
    """Refuse, before the model loads, what a federated run would not do as named."""
    require_flower(config.federated.engine)
    names = [s.name for s in stack.strategies]
    if names[0] != "lora":
        raise RetainError(f"federated: the clients average LoRA adapters, so the strategy must own LoRA weights "
                          f"through 'lora' (got '{names[0]}'); e.g. lora or lora+replay")
    for name in names[1:]:
        if name not in CLIENT_STRATEGIES:
            raise RetainError(f"federated: '{name}' keeps state a client cannot carry between rounds as JSON; "
                              f"client strategies: {', '.join(CLIENT_STRATEGIES)}")
    if config.online is not None:
        raise RetainError("federated: online mode is not supported; train with task boundaries")
    if config.privacy is not None:
        raise RetainError("federated: record-level DP-SGD on the clients (privacy:) is not supported; "
                          "federated.dp adds client-level DP to the averaged updates instead")
    if config.federated.dp is not None and importlib.util.find_spec("opacus") is None:
        raise RetainError("federated.dp: its epsilon is computed with Opacus's accountant, which is not installed "
                          "(pip install 'retain[privacy]')")
    k = config.federated.clients
    small = [t.name for t in stream.tasks if len(t.train) < k]
    if small:
        raise RetainError(f"federated.clients {k}: task '{small[0]}' has fewer training examples than clients")


def shard(task: "Task", client: int, clients: int) -> "Task":
    """Client ``client``'s share of a task's training examples (every clients-th, so shards are disjoint)."""
    return dataclasses.replace(task, train=task.train[client::clients])


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that travel: those that train (the LoRA adapter), by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


class Proximal(Strategy):
    """FedProx's client term (mu/2)||w - w_global||^2 on the adapter; a client-side companion,
    not a registered method."""

    name = "fedprox"

    def __init__(self, mu: float, anchor: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.mu, self.anchor = mu, anchor

    def extra_loss(self, ctx: Context, batch, outputs, items):
        terms = [((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in ctx.model.named_parameters()
                 if p.requires_grad and n in self.anchor]
        return 0.5 * self.mu * sum(terms) if terms and self.mu else None


# -- the client ------------------------------------------------------------------------
_CLIENTS: dict[tuple[str, int], tuple[Any, Any]] = {}  # (config, client) -> (ctx, stack), per process


def _client(config_text: str, client: int):
    """The client's model and strategies, built once per worker process."""
    key = (config_text, client)
    if key not in _CLIENTS:
        from retain.config import validate_config
        from retain.loop import prepare
        from retain.ui import UI

        config = validate_config(yaml.safe_load(config_text), source="federated run config")
        ctx, stack = prepare(config, UI(quiet=True))
        k = config.federated.clients
        ctx.stream = dataclasses.replace(ctx.stream, tasks=[shard(t, client, k) for t in ctx.stream.tasks])
        _CLIENTS[key] = (ctx, stack)
    return _CLIENTS[key]


def train_client(config_text: str, client: int, phase: int, round_: int, weights: dict[str, torch.Tensor],
                 state: dict[str, Any], mu: float, score: bool,
                 drop: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One round on one client: load the global adapter and the client's strategy state, train
    ``local_steps`` steps on its shard of the phase's task, return its adapter and what it reports.
    ``drop`` is the server's fault drill (``DROP_ENV``)."""
    if drop and drop == f"{client}:{phase + 1}:{round_}":
        raise RuntimeError(f"client {client} dropped in round {round_} of phase {phase + 1} ({DROP_ENV})")
    from retain.evaluation.scoring import evaluate_task
    from retain.loop import Run
    from retain.strategies import StrategyStack
    from retain.ui import UI

    ctx, stack = _client(config_text, client)
    config = ctx.config
    stack.load_state_dict(ctx, state)
    ctx.model.load_state_dict(weights, strict=False)
    local = config.model_copy(update={
        "seed": config.seed + 1000 * (client + 1) + 100 * phase + round_,
        "train": config.train.model_copy(update={"max_steps": config.federated.local_steps, "checkpoint_every": 0}),
        "federated": None,  # the client trains locally
    })
    ctx.config = local
    ctx.phase = phase
    strategies = stack.strategies + ([Proximal(mu, weights)] if mu else [])
    run = Run(local, None, UI(quiet=True))
    task = ctx.stream.tasks[phase]
    timing = run.train_phase(ctx, StrategyStack(strategies), [task], phase)
    ctx.config = config
    report: dict[str, Any] = {"examples": len(task.train), "loss_last": timing["loss_last"],
                              "tokens": timing["tokens"], "train_s": timing["train_s"],
                              "state": json.dumps(stack.state_dict())}
    if score:  # the client's own last local model on every task
        report["scores"] = [evaluate_task(ctx.model, ctx.tokenizer, t, batch_size=config.eval.batch_size,
                                          max_new_tokens=config.eval.max_new_tokens,
                                          max_length=config.eval.max_length).value
                            for t in ctx.stream.tasks]
    return adapter(ctx.model), report


def client_app():
    """Flower's ClientApp around ``train_client``."""
    from flwr.app import ArrayRecord, ConfigRecord, Context as FlowerContext, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: FlowerContext) -> Message:
        cfg = msg.content["config"]
        client = int(context.node_config["partition-id"])
        federated = yaml.safe_load(cfg["run-config"])["federated"]  # parsed once per round
        expected = federated["clients"]
        if int(context.node_config.get("num-partitions", expected)) != expected:
            raise RetainError(f"this SuperNode says num-partitions={context.node_config['num-partitions']}, the run "
                              f"has federated.clients={expected}")
        weights = msg.content["arrays"].to_torch_state_dict()
        states = json.loads(cfg["states"])
        new, report = train_client(cfg["run-config"], client, int(cfg["phase"]), int(cfg["server-round"]), weights,
                                   states.get(str(client), {}), float(cfg.get("proximal-mu", 0.0)),
                                   bool(cfg["score"]), drop=str(cfg.get("drop", "")))
        # Client-level DP averages uniformly (an example-weighted mean would reveal the clients' sizes).
        metrics = MetricRecord({"num-examples": 1 if federated.get("dp") else report["examples"],
                                "examples": report["examples"], "client": client,
                                "loss": float(report["loss_last"] or 0.0), "tokens": report["tokens"]})
        extra = ConfigRecord({"state": report["state"], "scores": json.dumps(report.get("scores"))})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics, "client": extra}), reply_to=msg)

    return app


# -- the server ------------------------------------------------------------------------
def client_level_epsilon(config: "RunConfig", phases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Client-level DP of the averaged updates: every round is one Gaussian release of the whole
    federation (all clients take part: no sampling amplification), composed by Opacus's RDP
    accountant. A client's whole data is the unit protected."""
    dp = config.federated.dp
    if dp is None:
        return None
    from retain.privacy import epsilon

    releases = sum(len(p["rounds"]) for p in phases)
    return {"noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm, "delta": dp.delta,
            "releases": releases, "unit": "client",
            "epsilon": round(epsilon([(dp.noise_multiplier, 1.0, releases)], dp.delta, "rdp"), 4)}



def serve_rounds(grid, config_text: str, phase: int, initial: dict[str, torch.Tensor],
                 states: dict[str, Any]) -> dict[str, Any]:
    """The server's part of one phase, wherever the ServerApp runs (this process for the
    simulation engine, the SuperLink's ServerApp process for the deployment engine): the
    rounds, through Flower's FedAvg or FedProx. Returns the global adapter, each round's
    clients, the clients' new strategy state and their scores of their own model."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg, FedProx
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    from retain.config import validate_config

    f = validate_config(yaml.safe_load(config_text), source="federated run config").federated
    states = dict(states)
    rounds: list[dict[str, Any]] = []
    scores: dict[str, list[float]] = {}

    def collect(replies, weight_key: str):
        """Each round's replies: the clients' figures and state (Flower averages the metrics)."""
        seen = []
        for reply in replies:
            m, extra = reply["metrics"], reply["client"]
            client = int(m["client"])
            states[str(client)] = json.loads(extra["state"])
            row = json.loads(extra["scores"])
            if row is not None:
                scores[str(client)] = row
            seen.append({"client": client, "examples": int(m["examples"]), "loss": float(m["loss"]),
                         "tokens": int(m["tokens"])})
        rounds.append({"clients": sorted(seen, key=lambda r: r["client"])})
        return aggregate_metricrecords(replies, weight_key)

    base = FedProx if f.aggregation == "fedprox" else FedAvg
    extra = {"proximal_mu": f.proximal_mu} if f.aggregation == "fedprox" else {}

    class Rounds(base):  # type: ignore[misc, valid-type]
        """Each round's message carries the clients' latest strategy state, and the last
        round's asks every client to score its local model."""

        def configure_train(self, server_round, arrays, config, grid):
            config["states"] = json.dumps(states)
            config["score"] = server_round == f.rounds
            config["drop"] = os.environ.get(DROP_ENV, "")
            return super().configure_train(server_round, arrays, config, grid)

    strategy = Rounds(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=f.clients,
                      min_available_nodes=f.clients, train_metrics_aggr_fn=collect, **extra)
    if f.dp is not None:
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

        # Flower's wrapper: clip each client's update to clipping_norm, add noise to the mean.
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, f.dp.noise_multiplier, f.dp.clipping_norm,
                                                              num_sampled_clients=f.clients)
    out = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=f.rounds,
                         train_config=ConfigRecord({"run-config": config_text, "phase": phase}))
    arrays = out.arrays.to_torch_state_dict() if out.arrays is not None else None
    return {"arrays": arrays, "rounds": rounds, "states": states, "scores": scores}


def simulate(config_text: str, phase: int, initial: dict[str, torch.Tensor], states: dict[str, Any],
             clients: int) -> dict[str, Any]:
    """One phase on Flower's simulation engine (one virtual SuperNode per client, on Ray)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        result.update(serve_rounds(grid, config_text, phase, initial, states))

    # address "local": a Ray of the simulation's own. Without it ray.init joins whatever cluster
    # this machine last recorded (/tmp/ray/ray_current_cluster), whose workers lack this
    # process's environment and may be shutting down.
    run_simulation(server_app=server, client_app=client_app(), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"address": "local"}})
    return result


class FederatedRun:
    """The server side of a run: one Flower run per phase, the clients' state between them."""

    def __init__(self, config: "RunConfig", state: dict[str, Any] | None, run_dir=None) -> None:
        self.config, self.run_dir = config, run_dir
        self.state = state or {"client_states": {}, "client_R": {}, "phases": []}

    def train_phase(self, ctx: Context, stack: "StrategyStack", tasks: list["Task"], phase: int) -> dict[str, Any]:
        f = self.config.federated
        stack.before_task(ctx, tasks)
        params = stack.trainable_parameters(ctx)
        ids = {id(p) for p in params}
        for p in ctx.model.parameters():
            p.requires_grad_(id(p) in ids)
        initial = adapter(ctx.model)
        config_text = yaml.safe_dump(self.config.resolved(), sort_keys=False)
        start = time.perf_counter()
        if f.engine == "deployment":
            from retain.federated_deploy import deploy

            result = deploy(self.run_dir, f.superlink, f.insecure, f.root_certificates, config_text, phase, initial,
                            self.state["client_states"])
        else:
            result = simulate(config_text, phase, initial, self.state["client_states"], f.clients)
        seconds = time.perf_counter() - start
        if result.get("arrays") is None:
            raise RetainError(f"federated: phase {phase + 1} ended without a global adapter (every client failed)")
        ctx.model.load_state_dict(result["arrays"], strict=False)
        ctx.model.eval()
        stack.after_task(ctx, tasks)
        rounds = result["rounds"]
        self.state["client_states"] = result["states"]
        for client, row in result["scores"].items():
            self.state["client_R"].setdefault(client, []).append(row)
        nbytes = sum(t.numel() * t.element_size() for t in initial.values())
        record = {"phase": phase, "rounds": rounds, "adapter_bytes": nbytes,
                  "bytes_per_round": [2 * nbytes * len(r["clients"]) for r in rounds]}
        self.state["phases"].append(record)
        tokens = sum(c["tokens"] for r in rounds for c in r["clients"])

        def loss(r: dict[str, Any]) -> float | None:  # the clients' last local loss, weighted by their examples
            n = sum(c["examples"] for c in r["clients"])
            return round(sum(c["loss"] * c["examples"] for c in r["clients"]) / n, 6) if n else None
        return {"phase": phase, "tasks": [t.name for t in tasks], "steps": f.rounds * f.local_steps,
                "train_s": round(seconds, 3), "trainable_parameters": sum(p.numel() for p in params),
                "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                "loss_first": loss(rounds[0]) if rounds else None, "loss_last": loss(rounds[-1]) if rounds else None,
                "federated": {"rounds": f.rounds, "clients": f.clients, "engine": f.engine,
                              "bytes": sum(record["bytes_per_round"])}}
