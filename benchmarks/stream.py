"""Built-in streams on the embedded model, one run per strategy, side by side.

Suites (each run is `retain run configs/<run>.yaml` in its own process, one after another):

- ``engine``: naive, lora, lora-per-task, lora-replay, joint on ``numbers``. Targets: naive
  BWT <= -10; lora-per-task BWT == 0; lora+replay BWT >= -3 with AA within 5 of joint.
  Also times the embedded model's first (de-quantizing) and cached loads.
- ``regularization``: ewc, ewc-online, lwf, distill-replay, sparse, lora-replay-ewc against
  naive (reused from the engine suite's results when present). Targets: each beats naive
  on BWT; Fisher estimate <= 10% of the task's training time; lwf <= 1.6x naive's time per step.
- ``cpt``: continual pre-training on ``domains``: plain, rewarm, mix, rewarm+mix; per-domain
  perplexity after each stage.
- ``architecture``: the memory and architecture methods (replay policies, generative replay,
  bottleneck adapters, L2P, LoRA experts, O-LoRA, per-task LoRA with routing and merging)
  against naive, lora+replay and joint (reused from the engine suite): AA, BWT, FM, probe,
  trainable parameters, peak memory, wall time; routing accuracy and task-agnostic AA.
- ``replay-budget``: lora+replay at buffer sizes 25, 50, 100, 200 for the reservoir,
  coreset and surprise policies: AA against buffer size (size 200 is the configs' own, so
  those three runs are reused from the engine and architecture suites).
- ``privacy``: lora+replay without DP and under DP-SGD at epsilon 1, 4, 8 per phase, and
  federated with 2 and 4 clients (5 rounds of 20 local steps per task) against the same
  training centralized: AA, BWT, probe, epsilon spent, membership-inference AUC (100 members
  and non-members per task), time per step. Resumable: a run whose results are kept is not
  run again (delete benchmarks/results/privacy/<run>.json to re-measure it).
- ``online``: task-free online learning (one stream, boundaries hidden and blurred) on ``numbers``
  and on ``standard-cl`` capped at 100 training examples per task (``online-cl-*``): LoRA alone,
  LoRA with online replay, MIR, tf-ewc and tf-lora; AAA, final AA, BWT, FM, online (prequential)
  accuracy, probe, hidden boundaries against detected shifts, each method paired against LoRA
  alone on the same test items. Resumable like ``privacy``.

A run whose process went away (a session's end) resumes from its last checkpoint when the suite
is started again.

Each run's results.json is copied to benchmarks/results/<suite>/, the summary to
benchmarks/results/<suite>.{md,json}.

    .venv/bin/python benchmarks/stream.py --suite engine [--only naive,lora]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, runs_dir, write
from retain.io import atomic_write_json
from retain.reporting import load_results
from retain.reporting.compare import compare_plot, comparison_table

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "engine": ["naive", "lora", "lora-per-task", "lora-replay", "joint"],
    "regularization": ["naive", "ewc", "lwf", "distill-replay", "sparse", "ewc-online", "lora-replay-ewc"],
    "cpt": ["cpt-plain", "cpt-rewarm", "cpt-mix", "cpt-rewarm-mix"],
    "architecture": ["naive", "lora-replay", "joint", "lora-replay-coreset", "lora-replay-surprise",
                     "generative-replay", "adapter-per-task", "l2p", "lora-experts", "olora", "lora-per-task-merge"],
}
BUDGETS = [25, 50, 100, 200]
POLICIES = ["reservoir", "coreset", "surprise"]
SUITES["replay-budget"] = [f"budget-{p}-{b}" for p in POLICIES for b in BUDGETS]
SUITES["privacy"] = ["private-none", "private-eps8", "private-eps4", "private-eps1", "federated-2", "federated-4"]
#: Online (task-free) methods, each on `numbers` and on a capped `standard-cl` (online-cl-*).
ONLINE = {
    "lora": ["strategy=lora"],
    "replay": ["strategy=lora+replay", "replay.buffer_size=200", "replay.ratio=0.5"],
    "mir": [],  # configs/online-mir.yaml as it is
    "tf-ewc": ["strategy=lora+tf-ewc"],
    "tf-lora": [],  # configs/online-tf-lora.yaml as it is
}
#: `numbers` in online mode: each batch trained 3 times (one pass of 1 step per batch left SmolLM2 at
#: chance on the first rule after its 400 examples), every task scored every 200 examples.
ONLINE_NUMBERS = ["online.passes=3", "online.eval_every=200"]
#: standard-cl in online mode, capped for 2 CPU cores: 100 training examples per task (each batch
#: trained 3 times), every task scored every 50 examples on 50 test items, the config's four probes
#: at the hidden boundaries; a checkpoint every 10 steps (a step is ~25 s here, and a session's end
#: kills the run; checkpoints do not change results).
ONLINE_CL = ["stream={name: standard-cl, order: 1, max_train: 100, max_test: 50}", "online.passes=3",
             "online.eval_every=50", "train.checkpoint_every=10",
             "eval.probe=[arc-easy,piqa,hellaswag,mmlu]"]
SUITES["online"] = [f"online-{m}" for m in ONLINE] + [f"online-cl-{m}" for m in ONLINE]
#: Every privacy run scores the probe on 50 seeded items per suite and runs the membership check.
PRIVACY_OVERRIDES = ["eval.probe_max=50", "eval.membership=100"]
# Where a suite's directory of per-run results lives (the engine suite predates suites).
FOLDER = {"engine": "stream", "regularization": "regularization", "cpt": "cpt", "architecture": "architecture",
          "replay-budget": "replay-budget", "privacy": "privacy", "online": "online"}
# Runs measured by the engine suite with the same config: reused, not run again.
REUSED = {"regularization": {"naive"}, "architecture": {"naive", "lora-replay", "joint"}}
# Budget runs whose config equals a run another suite measured (buffer 200 is the configs' size).
SAME_AS = {"budget-reservoir-200": "stream/lora-replay", "budget-coreset-200": "architecture/lora-replay-coreset",
           "budget-surprise-200": "architecture/lora-replay-surprise"}


#: Suites first measured (2026-11-24 to 11-28) when `eval.probe: true` meant the `facts` probe: a run
#: of theirs scores that probe by name, so a re-measured row stays comparable with the rest of its table.
FACTS_PROBE_SUITES = {"engine", "regularization", "cpt", "architecture", "replay-budget"}


def shared_result(suite: str, name: str) -> Path | None:
    """The results file of a run another suite measured with the same config, if there is one."""
    if name in REUSED.get(suite, ()) and (reused := RESULTS / "stream" / f"{name}.json").is_file():
        return reused  # the same config, measured by the engine suite
    if name in SAME_AS and (same := RESULTS / f"{SAME_AS[name]}.json").is_file():
        return same
    return None


def command(name: str) -> tuple[str, list[str]]:
    """The config a run uses and its overrides (budget runs are lora-replay with a policy and size)."""
    if name.startswith("budget-"):
        _, policy, size = name.split("-")
        return "lora-replay", [f"replay.policy={policy}", f"replay.buffer_size={size}", f"name={name}"]
    if name == "private-none":
        return "lora-replay", [*PRIVACY_OVERRIDES, f"name={name}"]
    if name.startswith("private-eps"):
        return "private-lora-replay", [*PRIVACY_OVERRIDES, f"privacy.epsilon={name[len('private-eps'):]}",
                                       f"name={name}"]
    if name.startswith("federated-"):
        return "lora-replay", [*PRIVACY_OVERRIDES, f"federated.clients={name.split('-')[1]}", "federated.rounds=5",
                               "federated.local_steps=20", f"name={name}"]
    if name.startswith("online-"):
        cl = name.startswith("online-cl-")
        method = name[len("online-cl-" if cl else "online-"):]
        config = "online-tf-lora" if method == "tf-lora" else "online-mir"
        return config, [*ONLINE[method], *(ONLINE_CL if cl else ONLINE_NUMBERS), f"name={name}"]
    return name, []


def load_times() -> dict:
    """Seconds to load the embedded model with an empty cache, then from the cache."""
    code = "import time,sys; t=time.perf_counter(); from retain.models import load_model; load_model('smollm2-135m-instruct'); print(time.perf_counter()-t)"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "RETAIN_CACHE_DIR": cache}
        runs = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for _ in range(2)]
    return {"first_load_s": round(runs[0], 2), "cached_load_s": round(runs[1], 2)}


def per_step(r: dict) -> float:
    return sum(t["train_s"] for t in r["timings"]) / sum(t["steps"] for t in r["timings"])


def regularization_checks(by_name: dict) -> list[str]:
    out = []
    naive = by_name.get("naive")
    for name, r in by_name.items():
        if name != "naive" and naive and r["metrics"]["BWT"] is not None:
            better = r["metrics"]["BWT"] > naive["metrics"]["BWT"]
            out.append(f"{name} BWT {r['metrics']['BWT']:+.1f} vs naive {naive['metrics']['BWT']:+.1f}: "
                       f"{'better' if better else 'NOT better'}")
    for name in ("ewc", "ewc-online"):
        if name in by_name:
            stats = by_name[name]["strategy_stats"]
            fisher = sum(s.get("ewc", {}).get("fisher_s", 0) for s in stats)
            train = sum(t["train_s"] for t in by_name[name]["timings"])
            per_task = [s.get("ewc", {}).get("fisher_s", 0) / t["train_s"]
                        for s, t in zip(stats, by_name[name]["timings"])]
            out.append(f"{name} Fisher estimate {fisher:.1f} s = {100 * fisher / train:.1f}% of training time "
                       f"{train:.0f} s (target <= 10%): {'met' if fisher <= 0.1 * train else 'NOT met'}; per task "
                       + ", ".join(f"{100 * f:.1f}%" for f in per_task))
    if "lwf" in by_name and naive:
        ratio = per_step(by_name["lwf"]) / per_step(naive)
        out.append(f"lwf time per step {per_step(by_name['lwf']):.2f} s = {ratio:.2f}x naive's {per_step(naive):.2f} s "
                   f"(target <= 1.6x): {'met' if ratio <= 1.6 else 'NOT met'}")
    if "sparse" in by_name:
        fr = [s.get("sparse", {}).get("changed_fraction") for s in by_name["sparse"]["strategy_stats"]]
        out.append("sparse: fraction of weights changed per task " + ", ".join(f"{100 * f:.2f}%" for f in fr if f is not None))
    return out


def cpt_tables(by_name: dict) -> list[str]:
    lines = []
    for name, r in by_name.items():
        lines += [f"**{name}** (`{r['strategy']}`): perplexity per domain (lower is better)", "",
                  "| after | " + " | ".join(r["tasks"]) + " |", "|---|" + "---|" * len(r["tasks"]),
                  "| base | " + " | ".join(f"{v:.2f}" for v in r["base"]) + " |"]
        lines += [f"| {'+'.join(p)} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for p, row in zip(r["phases"], r["R"])]
        lines += ["", f"probe {r['probe']['base']:.1f} -> {r['probe']['after_phase'][-1]:.1f}, wall {r['wall_s']:.0f} s", ""]
    return lines


def checks(by_name: dict) -> list[str]:
    out = []
    m = lambda n, k: by_name[n]["metrics"][k] if n in by_name else None  # noqa: E731
    if m("naive", "BWT") is not None:
        out.append(f"naive BWT {m('naive', 'BWT'):+.1f} <= -10: {'met' if m('naive', 'BWT') <= -10 else 'NOT met'}")
    if m("lora-per-task", "BWT") is not None:
        out.append(f"lora-per-task BWT {m('lora-per-task', 'BWT'):+.1f} == 0: "
                   f"{'met' if m('lora-per-task', 'BWT') == 0 else 'NOT met'}")
    if m("lora-replay", "BWT") is not None:
        out.append(f"lora+replay BWT {m('lora-replay', 'BWT'):+.1f} >= -3: "
                   f"{'met' if m('lora-replay', 'BWT') >= -3 else 'NOT met'}")
        if m("joint", "AA") is not None:
            gap = m("joint", "AA") - m("lora-replay", "AA")
            out.append(f"lora+replay AA {m('lora-replay', 'AA'):.1f} vs joint {m('joint', 'AA'):.1f} "
                       f"(gap {gap:.1f} <= 5): {'met' if gap <= 5 else 'NOT met'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="engine")
    ap.add_argument("--only", default=None, help="comma-separated subset of the suite's runs")
    ap.add_argument("--out", default=str(runs_dir("stream")),
                    help="run directories (default: $RETAIN_BENCH_DIR/stream or ~/.cache/retain/bench/stream)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="rebuild the summary from the per-run results already in benchmarks/results/<suite>/")
    ap.add_argument("--seeds", default=None, help="e.g. 0,1,2: each run once per seed (resumable), summarized "
                    "as mean, std and 95%% interval over seeds and items in benchmarks/results/<suite>-seeds.md")
    args = ap.parse_args()
    folder = FOLDER[args.suite]
    if args.seeds:
        seeded_suite(args)
        return

    loads = load_times() if args.suite == "engine" else None
    results = {}
    for name in (args.only.split(",") if args.only else SUITES[args.suite]):
        if (shared := shared_result(args.suite, name)) is not None:
            results[name] = load_results(shared)
            continue
        kept = RESULTS / folder / f"{name}.json"
        if args.summarize_only or (args.suite in ("privacy", "online") and kept.is_file()):
            if kept.is_file():
                results[name] = load_results(kept)
            continue
        # One process per run, exactly as a user runs it, so peak memory is the run's own; a run
        # whose process went away resumes from its last checkpoint.
        start = time.perf_counter()
        config, overrides = command(name)
        if args.suite in FACTS_PROBE_SUITES:
            overrides = [*overrides, "eval.probe=facts"]
        retain, run_dir = str(Path(sys.executable).parent / "retain"), Path(args.out) / name
        if (run_dir / "checkpoints" / "state.json").is_file() and not (run_dir / "results.json").is_file():
            cmd = [retain, "run", "--resume", str(run_dir), "--quiet"]
        else:
            cmd = [retain, "run", str(ROOT / "configs" / f"{config}.yaml"), *overrides, f"output_dir={args.out}",
                   "--overwrite", "--quiet"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        results[name] = load_results(Path(args.out) / name)
        print(f"{name}: {results[name]['metrics']} in {time.perf_counter() - start:.0f}s", flush=True)
        atomic_write_json(RESULTS / folder / f"{name}.json", results[name])
    if args.only and args.suite != "engine":
        # The summary covers every finished run of the suite, not only those this call ran.
        for name in SUITES[args.suite]:
            kept = shared_result(args.suite, name) or RESULTS / folder / f"{name}.json"
            if name not in results and kept.is_file():
                results[name] = load_results(kept)
        results = {n: results[n] for n in SUITES[args.suite] if n in results}
    runs = list(results.values())
    if args.suite != "engine":
        summarize_suite(args.suite, folder, results, runs)
        return
    compare_plot(runs, RESULTS / "stream.png")
    lines = checks(results)
    md = "\n".join([
        "# Built-in stream on the embedded model", "",
        f"`numbers` stream (4 tasks, 100 test items each), SmolLM2-135M-Instruct, seed 0; "
        f"{machine()['device']}, {machine()['torch_threads']} threads, {machine()['date']}. "
        "Configs: `configs/<run>.yaml`; per-run results in `stream/`.", "",
        comparison_table(runs), "",
        "Targets:", "", *[f"- {line}" for line in lines], "",
        f"Embedded model load: {loads['first_load_s']} s the first time (GGUF de-quantized), "
        f"{loads['cached_load_s']} s from the safetensors cache (target < 5 s).", "",
        "![comparison](stream.png)", "",
    ])
    write("stream", {"machine": machine(), "loads": loads, "checks": lines,
                     "runs": {n: {k: r[k] for k in ("metrics", "probe", "wall_s", "R", "base", "peak_memory_mb",
                                                   "train_tokens_per_s")} for n, r in results.items()}}, md)


#: Seeded runs score the default probe suite (arc-easy, piqa, hellaswag) on 50 seeded items each:
#: all 1,500 items after every phase would cost over an hour per run on 2 CPU cores.
SEEDED_OVERRIDES = ["eval.probe_max=50"]


def seeded_suite(args) -> None:
    """Every run of the suite with ``--seeds``, resumable seed by seed across sessions.

    Each finished seed's results.json is kept in ``benchmarks/results/<suite>-seeds/<run>/seed-<s>.json``
    (committed with the code), so a benchmark whose machine went away mid-suite redoes at most the
    seed that was running; a seed with a checkpoint in ``--out`` resumes from it.
    """
    import json

    from retain.config import load_config
    from retain.reporting.report import fmt
    from retain.seeds import aggregate

    folder = RESULTS / f"{FOLDER[args.suite]}-seeds"
    seeds = [int(s) for s in args.seeds.split(",")]
    retain = str(Path(sys.executable).parent / "retain")
    aggregates = {}
    only = args.only.split(",") if args.only else SUITES[args.suite]
    # The summary keeps every run of the suite whose seeds are all kept, not only those trained now.
    for name in SUITES[args.suite] + [n for n in only if n not in SUITES[args.suite]]:
        config, overrides = command(name)
        overrides = [*SEEDED_OVERRIDES, *overrides, f"name={name}"]
        runs = []
        for seed in seeds:
            kept = folder / name / f"seed-{seed}.json"
            if not kept.is_file() and not args.summarize_only and name in only:
                run_dir = Path(args.out) / "seeds" / name / f"seed-{seed}"
                if (run_dir / "checkpoints" / "state.json").is_file() and not (run_dir / "results.json").is_file():
                    cmd = [retain, "run", "--resume", str(run_dir), "--quiet"]
                else:
                    cmd = [retain, "run", str(ROOT / "configs" / f"{config}.yaml"), *overrides, f"seed={seed}",
                           f"name=seed-{seed}", f"output_dir={run_dir.parent}", "--overwrite", "--quiet"]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                atomic_write_json(kept, load_results(run_dir))
                print(f"{name} seed {seed}: {time.perf_counter() - start:.0f}s", flush=True)
            if kept.is_file():
                runs.append(json.loads(kept.read_text()))
        if len(runs) == len(seeds):
            cfg = load_config(ROOT / "configs" / f"{config}.yaml", [*overrides, f"seeds=[{args.seeds}]"])
            aggregates[name] = aggregate(cfg, runs)
            atomic_write_json(folder / f"{name}.json", aggregates[name])

    def cell(m: dict, key: str) -> str:
        v = m.get(key)
        if not v:
            return "n/a"
        ci = v.get("interval")
        span = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
        return f"{fmt(v['mean'])} ± {fmt(v['std'])}{span}"

    rows = [f"| {n} | {a['strategy']} | {', '.join(map(str, a['seeds']))} | " +
            " | ".join(cell(a["metrics"], k) for k in ("AA", "BWT", "FWT", "FM", "probe_retention")) + " |"
            for n, a in aggregates.items()]
    m = machine()
    md = "\n".join([f"# `{args.suite}` suite over seeds", "",
                    f"{m['device']}, {m['torch_threads']} threads, {m['date']}; configs `configs/<run>.yaml` with "
                    f"{', '.join(f'`{o}`' for o in SEEDED_OVERRIDES)}; one run per seed, each seed's results.json in "
                    f"`{folder.name}/<run>/`. Cells: mean ± standard deviation over seeds [95% interval over seeds and "
                    "test items].", "",
                    "| run | strategy | seeds | AA | BWT | FWT | FM | probe retained % |", "|" + "---|" * 8, *rows, ""])
    write(f"{FOLDER[args.suite]}-seeds", {"machine": m, "overrides": SEEDED_OVERRIDES,
                                          "runs": {n: {k: v for k, v in a.items() if k != "runs"}
                                                   for n, a in aggregates.items()}}, md)


def architecture_table(results: dict) -> list[str]:
    """One row per run: forgetting metrics, cost, and for per-task methods the routed scores."""
    from retain.reporting.report import fmt

    rows = ["| run | strategy | AA | BWT | FM | probe retained % | trainable params | peak MB | wall s "
            "| routing % | AA routed |", "|" + "---|" * 11]
    merges = []
    for name, r in results.items():
        m, routing = r["metrics"], r.get("routing") or {}
        params = (r["timings"][0].get("trainable_parameters") if r.get("timings") else None)
        rows.append(f"| {name} | {r['strategy']} | {fmt(m.get('AA'))} | {fmt(m.get('BWT'), signed=True)} | "
                    f"{fmt(m.get('FM'))} | {fmt((r.get('probe') or {}).get('retention'))} | "
                    f"{params if params is not None else '-'} | {fmt(r.get('peak_memory_mb'), 0)} | "
                    f"{fmt(r.get('wall_s'), 0)} | {fmt(routing.get('accuracy'))} | {fmt(routing.get('AA'))} |")
        for method, v in ((r.get("final") or {}).get("merge") or {}).get("methods", {}).items():
            merges.append(f"| {name} | {method} | {fmt(v['AA'])} | {fmt(v['probe'])} |")
    if merges:
        rows += ["", "Merged adapters (one adapter scored on every task):", "",
                 "| run | method | AA | probe |", "|---|---|---|---|", *merges]
    return rows


def budget_table(results: dict, plot: Path) -> list[str]:
    """AA of each policy at each buffer size, as a table and a line plot."""
    from retain.reporting.plots import save_figure, plt
    from retain.reporting.report import fmt

    aa = {p: {b: results[f"budget-{p}-{b}"]["metrics"].get("AA") for b in BUDGETS if f"budget-{p}-{b}" in results}
          for p in POLICIES}
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, points in aa.items():
        if points:
            ax.plot(list(points), list(points.values()), marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax.set_xlabel("buffer size (examples)")
    ax.set_ylabel("AA")
    ax.legend()
    save_figure(fig, plot)

    def cell(policy: str, size: int) -> str:
        m = results[f"budget-{policy}-{size}"]["metrics"] if f"budget-{policy}-{size}" in results else {}
        return f"{fmt(m.get('AA'))} ({fmt(m.get('BWT'), signed=True)})"

    return ["AA (BWT) of each policy at each buffer size:", "",
            "| policy | " + " | ".join(str(b) for b in BUDGETS) + " |", "|" + "---|" * (len(BUDGETS) + 1),
            *[f"| {p} | " + " | ".join(cell(p, b) for b in BUDGETS) + " |" for p in POLICIES]]


def privacy_table(results: dict) -> list[str]:
    """AA, BWT, probe, epsilon, membership AUC and time per step, each run against no DP."""
    base = results.get("private-none")
    rows = ["| run | AA | BWT | probe retained % | epsilon (stream) | MIA AUC base -> final | s / step | "
            "x no-DP | MiB sent |", "|---|" + "---|" * 8]
    for name, r in results.items():
        m, mia = r["metrics"], r.get("membership") or {}
        auc = (f"{mia['base']['auc']:.3f} -> {mia['final']['auc']:.3f}" if mia.get("base") and mia.get("final")
               else "n/a")
        eps = (r.get("privacy") or {}).get("epsilon")
        sent = sum(sum(p["bytes_per_round"]) for p in (r.get("federated") or {}).get("phases", [])) / 2**20
        ratio = f"{per_step(r) / per_step(base):.2f}" if base else "n/a"
        cell = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
        rows.append(f"| {name} | {cell(m.get('AA'), '.1f')} | {cell(m.get('BWT'), '+.1f')} | "
                    f"{cell((r.get('probe') or {}).get('retention'), '.1f')} | {cell(eps, '.2f') if eps else 'none'} | "
                    f"{auc} | {per_step(r):.2f} | {ratio} | {sent:.1f} |")
    return rows + ["", "One seed each: differences of a few points are within noise (see the seeded engine "
                   "suite). Federated steps are per client and round; its time includes Flower and Ray."]


def online_table(results: dict) -> list[str]:
    """Anytime and final accuracy, forgetting, probe, where shifts fell and cost; then each method
    paired against plain LoRA on the same stream (the same test items)."""
    from retain.reporting.compare import paired_table
    from retain.reporting.report import fmt

    def ci(r: dict, key: str) -> str:
        lo_hi = ((r.get("intervals") or {}).get("metrics") or {}).get(key)
        value = fmt(r["metrics"].get(key), signed=key == "BWT")
        return f"{value} [{fmt(lo_hi[0])}, {fmt(lo_hi[1])}]" if lo_hi else value

    rows = ["| run | strategy | AAA | final AA [95%] | BWT [95%] | FM | online acc | probe retained % | "
            "hidden boundaries | detected shifts | s / step | wall s |", "|---|" + "---|" * 11]
    for name, r in results.items():
        o = r.get("online") or {}
        shifts, bounds = o.get("shifts"), ", ".join(map(str, o.get("boundaries", [])))
        rows.append(f"| {name} | {r['strategy']} | {fmt(o.get('AAA'))} | {ci(r, 'AA')} | {ci(r, 'BWT')} | "
                    f"{fmt(r['metrics'].get('FM'))} | {fmt(o.get('online_accuracy'))} | "
                    f"{fmt((r.get('probe') or {}).get('retention'))} | {bounds} | "
                    f"{'-' if shifts is None else ', '.join(map(str, shifts)) or 'none'} | {per_step(r):.2f} | "
                    f"{fmt(r.get('wall_s'), 0)} |")
    lines = rows + [""]
    for prefix, label in (("online-", "`numbers`"), ("online-cl-", "`standard-cl`")):
        group = {n: [r] for n, r in results.items() if n.startswith(prefix) and (prefix == "online-cl-"
                                                                                   or not n.startswith("online-cl-"))}
        if f"{prefix}lora" in group and len(group) > 1:
            table, _ = paired_table(f"{prefix}lora", group)
            lines += [f"On {label}:", "", table, ""]
    return lines + ["One seed each; the paired intervals resample test items, so they show what the test set "
                    "can resolve, not seed-to-seed variation. s / step includes the anytime evaluations and "
                    "the prequential scoring, which run inside the pass."]


def summarize_suite(suite: str, folder: str, results: dict, runs: list) -> None:
    m = machine()
    # Runs are kept and resumed one by one, often on different machines, so this line names
    # only where the summary was written; times compare within one machine (see the README).
    head = [f"Summary written {m['date']} ({m['device']}); runs measured one by one, possibly on different "
            f"CPUs and thread counts; configs `configs/<run>.yaml`; per-run results in `{folder}/`.", ""]
    if suite == "cpt":
        body = ["# Continual pre-training on the `domains` stream", "", *head, *cpt_tables(results)]
    elif suite == "architecture":
        compare_plot(runs, RESULTS / f"{folder}.png")
        body = ["# Memory and architecture methods on the `numbers` stream", "", *head,
                *architecture_table(results), "", f"![comparison]({folder}.png)", ""]
    elif suite == "privacy":
        body = ["# Privacy: DP-SGD and federated lora+replay on the `numbers` stream", "", *head,
                *privacy_table(results), ""]
    elif suite == "online":
        body = ["# Online (task-free) learning: one pass, boundaries hidden and blurred", "", *head,
                *online_table(results), ""]
    elif suite == "replay-budget":
        body = ["# Replay memory budget: AA against buffer size (lora+replay, `numbers`)", "", *head,
                *budget_table(results, RESULTS / f"{folder}.png"), "", f"![budget]({folder}.png)", ""]
    else:
        compare_plot(runs, RESULTS / f"{folder}.png")
        lines = regularization_checks(results)
        body = ["# Regularization and distillation on the `numbers` stream", "", *head, comparison_table(runs), "",
                "Targets:", "", *[f"- {line}" for line in lines], "", f"![comparison]({folder}.png)", ""]
    write(folder, {"machine": m, "runs": {n: {k: r.get(k) for k in ("metrics", "probe", "wall_s", "R", "base",
                                                                     "strategy_stats", "timings", "online")}
                                          for n, r in results.items()}}, "\n".join(body))


if __name__ == "__main__":
    main()
