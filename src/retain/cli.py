"""The ``retain`` command line: run, report, compare, study, list, generate, serve, export, validate."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from retain.errors import RetainError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continual learning for LLMs: train a task stream, measure forgetting, ship adapters.\n\n"
    "Start with `retain run configs/demo.yaml`, then open the report it prints.",
)
out = Console()
err = Console(stderr=True)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("accelerate", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _metrics_table(results: dict) -> Table:
    from retain.reporting.report import METRIC_HEADER, metric_rows

    table = Table(title=f"{results['name']} ({results['strategy']} on {results['stream']})")
    for h in METRIC_HEADER:
        table.add_column(h, justify="right")
    table.add_row(*metric_rows(results)[0])
    return table


def _matrix_table(results: dict) -> Table:
    from retain.reporting.report import fmt

    table = Table(title="R[i][j]: score on task j after phase i")
    table.add_column("")
    for t in results["tasks"]:
        table.add_column(t, justify="right")
    table.add_row("base", *[fmt(v) for v in results["base"]])
    for phase, row in zip(results["phases"], results["R"]):
        table.add_row("after " + "+".join(phase), *[fmt(v) for v in row])
    return table


RAY_HELP = ("Train the runs (seeds, a study's arms) at once as Ray tasks: auto (this machine's cluster), "
            "HOST:PORT of a head node, ray://HOST:PORT, or local (a Ray for this command). Each resumes from its "
            "checkpoint; run directories must be on storage every node sees. Needs retain[ray].")


def _ray_options(address: str | None, cpus: float, gpus: float):
    if address is None:
        if cpus != 1 or gpus:
            raise RetainError("--cpus-per-run / --gpus-per-run apply to runs dispatched with --ray ADDRESS")
        return None
    from retain.dispatch import RayOptions

    return RayOptions(address, cpus, gpus)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=20"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a killed run from its last checkpoint (every train.checkpoint_every steps inside a task, and at each task end)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Run once per seed, e.g. 0,1,2: seed-<s>/ runs "
                                        "under the run directory and aggregate.json with mean, std and "
                                        "95% intervals over seeds and items (the config's `seeds:`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-task lines."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    cpus_per_run: float = typer.Option(1, "--cpus-per-run", min=0.01,
                                       help="CPUs each dispatched run asks of its node."),
    gpus_per_run: float = typer.Option(0, "--gpus-per-run", min=0,
                                       help="GPUs each dispatched run asks of its node."),
) -> None:
    """Train the stream, score every task after each one, write runs/<name>/ with results and report.

    Data-parallel: `torchrun --standalone --nproc_per_node N -m retain.cli run CONFIG`.

    It splits each batch and each evaluation over N processes (README: Data-parallel runs)."""
    from retain.config import load_config
    from retain.loop import execute, load_run_config, run_dir_for
    from retain.seeds import run_seeds

    if resume is not None:
        if config is not None or seeds is not None:
            raise RetainError("give either CONFIG or --resume RUN, not both (a resumed run keeps its seeds)")
        cfg = load_run_config(resume)
        run_dir = resume
    else:
        if config is None:
            raise RetainError("missing CONFIG; e.g. `retain run configs/demo.yaml`")
        extra = [f"seeds=[{seeds}]"] if seeds is not None else []
        cfg = load_config(config, (overrides or []) + extra)
        run_dir = run_dir_for(cfg)
    options = _ray_options(ray, cpus_per_run, gpus_per_run)
    if options is not None and not cfg.seeds:
        raise RetainError("--ray dispatches the seeds of a multi-seed run (--seeds 0,1,2 or `seeds:`) or the arms "
                          "of a study (retain study --ray); a single run trains here")
    if cfg.seeds:
        agg = run_seeds(cfg, run_dir=run_dir, resume=resume is not None, quiet=quiet, overwrite=overwrite,
                        ray=options)
        out.print((run_dir / "report.md").read_text(encoding="utf-8"), markup=False, highlight=False)
        out.print(f"report: {run_dir / 'report.md'}  (aggregate.json; one run per seed in "
                  f"{', '.join(agg['runs'])})")
        return
    results = execute(cfg, run_dir=run_dir, resume=resume is not None, quiet=quiet, overwrite=overwrite)
    from retain.parallel import main_process

    if not main_process():  # a data-parallel run prints once
        return
    out.print(_matrix_table(results))
    out.print(_metrics_table(results))
    out.print(f"report: {run_dir / 'report.md'}  (also report.html, results.json)")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A finished run directory.")) -> None:
    """Rebuild report.md, report.html and plots from a run's results.json (a multi-seed run:
    its report.md from aggregate.json)."""
    from retain.reporting import load_results, write_report
    from retain.seeds import AGGREGATE, aggregate_markdown

    if (run_dir / AGGREGATE).is_file():
        import json

        from retain.io import atomic_write_text

        md = aggregate_markdown(json.loads((run_dir / AGGREGATE).read_text(encoding="utf-8")))
        atomic_write_text(run_dir / "report.md", md)
        out.print(md, markup=False, highlight=False)
        out.print(f"report: {run_dir / 'report.md'}")
        return

    results = load_results(run_dir)
    path = write_report(run_dir, results)
    out.print(_matrix_table(results))
    out.print(_metrics_table(results))
    out.print(f"report: {path}")


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write compare.md and compare.png here."),
) -> None:
    """A side-by-side table (and with --out, a plot) of several runs."""
    from retain.reporting import compare_runs

    table, _ = compare_runs(runs, out_dir)
    out.print(table, markup=False, highlight=False)
    if out_dir:
        out.print(f"written: {out_dir / 'compare.md'}, {out_dir / 'compare.png'}")


@app.command()
def study(
    config: Path = typer.Argument(..., help="YAML study: a name and a list of arms (run configs)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for every arm (after the "
                                                    "study's and the arm's set), e.g. train.max_steps=50"),
    name: Optional[str] = typer.Option(None, "--name", help="Study name, i.e. the folder under output_dir "
                                       "(default: the file's); give a variant with overrides its own"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-task lines."),
    export: Optional[Path] = typer.Option(None, "--export", help="Also copy the report, its plot and each "
                                          "arm's results.json (as ARM.json) into this folder, to commit or "
                                          "share without checkpoints and weights."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    cpus_per_run: float = typer.Option(1, "--cpus-per-run", min=0.01,
                                       help="CPUs each dispatched arm asks of its node."),
    gpus_per_run: float = typer.Option(0, "--gpus-per-run", min=0,
                                       help="GPUs each dispatched arm asks of its node."),
) -> None:
    """Run every unfinished arm of a study (a killed one resumes), then write study.md side by side."""
    from retain.study import run_study

    path = run_study(config, quiet=quiet, overrides=overrides or [], name=name, export=export,
                     ray=_ray_options(ray, cpus_per_run, gpus_per_run))
    out.print(path.read_text(encoding="utf-8").split("![study]")[0], markup=False, highlight=False)
    out.print(f"study report: {path}  (also study.png)" + (f"; copy with each arm's results in {export}" if export else ""))


@app.command("list")
def list_(
    strategy: Optional[str] = typer.Argument(None, help="A strategy: print its options (default, allowed range, "
                                             "meaning), its hooks and what it cannot be combined with."),
) -> None:
    """Strategies, models and built-in streams; `retain list STRATEGY` for one strategy's options."""
    from retain.models import describe_models
    from retain.streams import BUILTIN_STREAMS
    from retain.strategies import registry

    if strategy is not None:
        _describe_strategy(strategy)
        return
    for title, rows in (
        ("strategies (join with +, e.g. lora+replay; `retain list NAME` for options)",
         [(n, c.summary + (f" [options: {c.options_key}:]" if c.options_key else "")) for n, c in sorted(registry().items())]),
        ("models", describe_models()),
        ("synthetic streams (fast demos and test fixtures)", [(n, d) for n, (_, d) in sorted(BUILTIN_STREAMS.items())]),
        ("benchmark streams (stream: {name: NAME, order: N, max_train: N, max_test: N, data_dir: DIR})",
         _benchmark_rows()),
        ("general-ability probes (eval.probe: [NAME, ...]; true: the default suite)", _probe_rows()),
    ):
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for row in rows:
            table.add_row(*row)
        out.print(table)


def _benchmark_rows() -> list[tuple[str, str]]:
    from retain.streams.benchmarks import NAMED_STREAMS, stream_sizes

    rows = []
    for name, spec in NAMED_STREAMS.items():
        sizes = stream_sizes(name)
        orders = "\n".join(f"order {o}{' (default)' if o == spec.default_order else ''}: {', '.join(tasks)}"
                           for o, tasks in spec.orders.items())
        tasks = ", ".join(f"{t} {tr}/{te} {spec.tasks[t].metric}" for t, (tr, te) in sizes.items())
        rows.append((name, f"{spec.description}\n{orders}\ntasks (train/test items, metric): {tasks}"))
    return rows


def _probe_rows() -> list[tuple[str, str]]:
    from retain.streams.benchmarks import DEFAULT_PROBES, FACTS, PROBES, probe_suite

    rows = []
    for name in PROBES:
        task = probe_suite(name)
        scoring = ("acc_norm" if task.choice_norm else "acc") if task.metric == "choice" else task.metric
        default = " (default)" if name in DEFAULT_PROBES else ""
        rows.append((name, f"{len(task.test)} items, {scoring}, chance {task.chance:.0f}{default}"))
    rows.append((FACTS, "214 facts the base SmolLM2-135M answers right (it can only fall), acc, chance 25"))
    return rows


def _allowed(field) -> str:
    """A field's allowed values: numeric bounds, or the choices of a Literal."""
    import typing

    from retain.config import field_bounds

    bounds = field_bounds(field)
    if bounds:
        return bounds
    ann = field.annotation
    args = [ann] if typing.get_origin(ann) is typing.Literal else [
        a for a in typing.get_args(ann) if a is not type(None)] or [ann]
    choices = [c for a in args if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
    return " | ".join(map(str, choices))


def _describe_strategy(name: str) -> None:
    from retain.strategies import registry
    from retain.strategies.base import refusal

    known = registry()
    if name not in known:
        raise RetainError(f"unknown strategy '{name}'; valid: {', '.join(sorted(known))}")
    cls = known[name]
    out.print(f"[bold]{name}[/bold]: {cls.summary}", highlight=False)
    out.print(f"hooks: {', '.join(sorted(cls.overridden()))}", highlight=False)
    private = ("covered by DP-SGD" if cls.not_private == "" else
               f"refused: {cls.not_private or 'not reviewed for DP-SGD'}")
    out.print(f"task-free (online:): {'yes' if cls.task_free else 'no'}; privacy: {private}", highlight=False)
    split = ("yes" if cls.data_parallel == "" else
             f"refused: {cls.data_parallel or 'not checked to give the one-process result'}")
    out.print(f"data-parallel (torchrun / accelerate launch): {split}", highlight=False)
    shards = "yes" if cls.sharded == "" else f"refused: {cls.sharded or 'not checked on sharded weights'}"
    out.print(f"sharded (train.sharding: zero2 / zero3): {shards}", highlight=False)
    if cls.Options is None:
        out.print("options: none")
    else:
        table = Table(title=f"options (section `{cls.options_key}:`)")
        for col in ("option", "default", "allowed", "meaning"):
            table.add_column(col)
        for key, field in cls.Options.model_fields.items():
            default = field.get_default(call_default_factory=True)
            table.add_row(field.alias or key, repr(default), _allowed(field), field.description or "")
        out.print(table)
    refused = [(other, refusal(cls, k) or refusal(k, cls)) for other, k in sorted(known.items()) if k is not cls]
    refused = [(o, r) for o, r in refused if r]
    if refused:
        table = Table(title="cannot be combined with", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for other, reason in refused:
            table.add_row(other, reason)
        out.print(table)


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    prompt: str = typer.Argument(..., help="The input, formatted with the task's template."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task whose format and adapter to use "
                                       "(default: routed from the input for per-task methods, else the last task)."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate."),
) -> None:
    """Answer PROMPT with the run's trained model (and, for per-task adapters, that task's adapter)."""
    from retain.evaluation import generate as gen
    from retain.loop import restore
    from retain.streams.task import Example

    ctx, stack = restore(run_dir)
    names = ctx.stream.task_names
    router = stack.task_router()
    if task is None and router is not None and router.centroids:
        task = router.predict(ctx, [prompt])[0]
        err.print(f"routed to task '{task}' (nearest task centroid)", highlight=False)
    if task is None:
        task = names[-1]
    if task not in names:
        raise RetainError(f"unknown task '{task}'; tasks of this run: {', '.join(names)}")
    spec = ctx.stream.tasks[names.index(task)]
    text = spec.prompt(ctx.tokenizer, Example(prompt, ""))
    with stack.route(ctx, task):
        answer = gen(ctx.model, ctx.tokenizer, [text], max_new_tokens=max_new_tokens)[0]
    out.print(answer.strip(), markup=False, highlight=False)


SERVE_HELP = (
    "Serve the run's models over OpenAI-compatible HTTP: /v1/models, /v1/completions, /v1/chat/completions "
    "(stream: true for server-sent events).\n\n"
    "`model` in a request names a task adapter, a merged adapter, `final` (the model as the run ended), `base` "
    "(adapters off) or `auto` (the run's task router picks the adapter; the response's `model` names it).\n\n"
    "Try: curl localhost:8000/v1/completions -H 'content-type: application/json' -d "
    "'{\"model\": \"auto\", \"prompt\": \"Is 481 an even number?\", \"max_tokens\": 4, \"temperature\": 0}'"
)


@app.command(help=SERVE_HELP)
def serve(
    run_dir: Path = typer.Argument(..., help="A finished run directory (one seed's folder of a multi-seed run)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RETAIN_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on every request."),
    max_batch: int = typer.Option(8, min=1, help="Requests for the same adapter answered by one generate call."),
    max_tokens: int = typer.Option(256, min=1, help="Upper bound on tokens generated per request."),
) -> None:
    """Serve the run's models over OpenAI-compatible HTTP: /v1/models, /v1/completions, /v1/chat/completions."""
    try:
        from retain.serve import serve as run_server
    except ImportError as exc:
        raise RetainError(f"retain serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'retain[serve]'") from None
    run_server(run_dir, host=host, port=port, api_key=api_key, max_batch=max_batch, max_tokens=max_tokens)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory (one seed's folder of a multi-seed run)."),
    out: Path = typer.Argument(..., help="Folder to write (must not exist unless --overwrite)."),
    merge: Optional[str] = typer.Option(None, help="Adapter merged into model/ (default: the one the run ends "
                                        "with, as its probe was scored)."),
    full_model: bool = typer.Option(True, "--model/--no-model", help="Write model/, the full merged model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write the run's adapters (PEFT), the merged model (transformers safetensors), a vLLM manifest,
    the task router, mergekit configs and a model card to OUT."""
    from retain.export import export as run_export

    manifest = run_export(run_dir, out, merge=merge, full_model=full_model, overwrite=overwrite)
    lines = [f"exported {run_dir} to {out}"]
    if manifest.get("adapters"):
        lines.append(f"  adapters  {', '.join(manifest['adapters'])} (base: {manifest['base']})")
        lines.append(f"  vllm      cd {out} && {' '.join(manifest['vllm']['command'])}")
    if manifest.get("model"):
        merged = manifest["model"]["merged_adapter"]
        lines.append("  model     model/" + (f" (adapter '{merged}' merged)" if merged else ""))
    for key in ("router", "mergekit"):
        if manifest.get(key):
            value = manifest[key]
            lines.append(f"  {key:<9} {value if isinstance(value, str) else ', '.join(value.values())}")
    lines.append("  card      README.md")
    print("\n".join(lines))  # `out` is the folder here, not the console


@app.command()
def validate(
    config: Path = typer.Argument(..., help="YAML run config."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
) -> None:
    """Check a config, its data files and its model spec without training anything."""
    from retain.config import load_config
    from retain.loop import check_run
    from retain.models import resolve_model_spec

    cfg = load_config(config, overrides or [])
    stream, stack = check_run(cfg)
    kind, location = resolve_model_spec(cfg.model)
    out.print(f"config ok: {config}")
    out.print(f"  model    {cfg.model} ({kind}: {location})")
    out.print(f"  strategy {stack.name}")
    if cfg.privacy is not None:
        p = cfg.privacy
        budget = f"epsilon {p.epsilon:g} per phase" if p.epsilon is not None else f"noise {p.noise_multiplier:g}"
        out.print(f"  privacy  DP-SGD, {budget}, delta {p.delta:g}, per-example clip {p.max_grad_norm:g} "
                  f"({p.accountant})")
    if cfg.federated is not None:
        f = cfg.federated
        where = f"SuperLink {f.superlink}" if f.engine == "deployment" else "simulated on Ray"
        out.print(f"  federated {f.clients} clients ({where}), {f.rounds} rounds x {f.local_steps} local steps "
                  f"per task, {f.aggregation}")
    for key in cfg.unused_sections():
        out.print(f"  note     section '{key}' configures a method not in this strategy; it is not used")
    for t in stream.tasks:
        out.print(f"  task     {t.name}: {len(t.train)} train, {len(t.test)} test, metric {t.metric}")
    for p in stream.probes:
        chance = f", chance {p.chance:.1f}" if p.chance is not None else ""
        scoring = ("acc_norm" if p.choice_norm else "acc") if p.metric == "choice" else p.metric
        out.print(f"  probe    {p.name}: {len(p.test)} items, scored by {scoring}{chance}")


def main() -> None:
    quiet_libraries()
    try:
        app()
    except RetainError as exc:
        # Plain print: one unwrapped line a user can grep and a test can match.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; continue with `retain run --resume RUN_DIR`")
        sys.exit(130)


if __name__ == "__main__":
    main()
