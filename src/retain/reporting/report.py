"""report.md and a self-contained report.html, built from results.json alone."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from retain.io import atomic_write_text
from retain.reporting import plots


def fmt(x: float | None, nd: int = 1, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    x = round(x, nd) + 0.0  # a metric of -1e-15 (or -0.0) reads 0.0, not -0.0
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def span(interval: list[float] | None, signed: bool = False) -> str:
    """A 95% interval as " [lo, hi]" ("" when there is none)."""
    if not interval:
        return ""
    return f" [{fmt(interval[0], signed=signed)}, {fmt(interval[1], signed=signed)}]"


def metric_rows(results: dict[str, Any]) -> list[list[str]]:
    m, probe = results["metrics"], results.get("probe") or {}
    ci = results.get("intervals") or {}
    mi, pi = ci.get("metrics") or {}, ci.get("probe") or {}
    return [[
        fmt(m.get("AA")) + span(mi.get("AA")), fmt(m.get("BWT"), signed=True) + span(mi.get("BWT"), True),
        fmt(m.get("FWT"), signed=True) + span(mi.get("FWT"), True), fmt(m.get("FM")) + span(mi.get("FM")),
        fmt(probe.get("base")), fmt((probe.get("after_phase") or [None])[-1]) + span(pi.get("final")),
        fmt(probe.get("retention")) + span(pi.get("retention")), fmt(results.get("wall_s"), 0),
    ]]


METRIC_HEADER = ["AA", "BWT", "FWT", "FM", "probe base", "probe final", "probe retained %", "wall s"]


def markdown(results: dict[str, Any], images: dict[str, str]) -> str:
    tasks = results["tasks"]
    lines = [
        f"# {results['name']}", "",
        f"model `{results['model']}` · strategy `{results['strategy']}` · stream `{results['stream']}` · "
        f"seed {results['seed']}", "",
        "## Metrics", "",
        *markdown_table(METRIC_HEADER, metric_rows(results)), "",
        "AA: mean final score. BWT: final minus just-learned score (negative = forgetting). "
        "FWT: score on a task before training on it, minus the base model's. FM: mean drop from the best "
        "earlier score. Probe: the mean of the general-ability probes (each below). In brackets: 95% "
        "intervals (bootstrap over test items, see results.json `intervals`).", "",
        "## Accuracy matrix R[i][j] (row: after training phase i; column: task j)", "",
    ]
    ci = results.get("intervals") or {}
    base_ci, R_ci = ci.get("base") or [None] * len(tasks), ci.get("R") or [[None] * len(tasks)] * len(results["R"])
    rows = [["base"] + [fmt(v) + span(c) for v, c in zip(results["base"], base_ci)]]
    rows += [["after " + "+".join(p)] + [fmt(v) + span(c) for v, c in zip(row, crow)]
             for p, row, crow in zip(results["phases"], results["R"], R_ci)]
    lines += markdown_table(["", *tasks], rows) + [""]
    if ci:
        lines += ["Cells: score [95% interval: Wilson for accuracies, else bootstrap over items].", ""]
    lines += online_section(results)
    lines += privacy_section(results)
    lines += federated_section(results)
    lines += probe_section(results)
    lines += forgotten_section(results)
    lines += ["## Timing", ""]
    lines += markdown_table(
        ["phase", "steps", "train s", "eval s", "tokens/s", "loss first", "loss last"],
        [["+".join(t["tasks"]), str(t["steps"]), fmt(t["train_s"]), fmt(t.get("eval_s")), fmt(t["tokens_per_s"], 0),
          fmt(t["loss_first"], 3), fmt(t["loss_last"], 3)] for t in results["timings"]],
    )
    lines += ["", f"Peak memory: {fmt(results.get('peak_memory_mb'), 0)} MB. "
              f"Training throughput: {fmt(results.get('train_tokens_per_s'), 0)} tokens/s.", ""]
    lines += update_section(results.get("updates") or [])
    lines += routing_section(results)
    lines += merge_section(results)
    for title, rel in images.items():
        lines += [f"![{title}]({rel})", ""]
    return "\n".join(lines)


def online_section(results: dict[str, Any]) -> list[str]:
    """Online mode: how the stream was presented, AAA, online accuracy, the anytime curve."""
    o = results.get("online")
    if not o:
        return []
    lines = ["## Online (task-free) learning", "",
             f"One pass over {o['examples']} examples ({o['schedule']} boundaries"
             + (f", blur {o['blur']}" if o["schedule"] == "blurry" else "") + f", {o['passes']} step(s) per batch); "
             f"hidden boundaries after {', '.join(str(b) for b in o['boundaries'][:-1]) or 'none'} examples. "
             "The rows of R above are the evaluations at those boundaries.", "",
             f"AAA (mean over evaluations of the mean score over the tasks seen so far): {fmt(o.get('AAA'))}. "
             f"Online accuracy (each incoming batch scored before it trains): {fmt(o.get('online_accuracy'))}"
             + (" (" + ", ".join(f"{t} {fmt(v)}" for t, v in o["online_accuracy_per_task"].items()) + ")"
                if o.get("online_accuracy_per_task") else "") + ".", ""]
    if o.get("shifts") is not None:
        lines += [f"Shifts detected at {', '.join(str(s) for s in o['shifts']) or 'none'} examples "
                  f"(hidden boundaries: {', '.join(str(b) for b in o['boundaries'][:-1])}).", ""]
    rows = [[str(c["examples"]), *[fmt(v) for v in c["scores"]], fmt(c["seen_mean"]), fmt(c.get("probe"))]
            for c in o["curve"]]
    return lines + [*markdown_table(["examples", *results["tasks"], "mean seen", "probe"], rows), ""]


def federated_section(results: dict[str, Any]) -> list[str]:
    """Federated runs: rounds, clients that answered, bytes sent, each client's own last model."""
    f = results.get("federated")
    if not f:
        return []
    rows = []
    for names, ph in zip(results["phases"], f["phases"]):
        answered = [len(r["clients"]) for r in ph["rounds"]]
        rows.append(["+".join(names), str(len(ph["rounds"])), " / ".join(map(str, answered)),
                     f"{sum(ph['bytes_per_round']) / 2**20:.2f}"])
    lines = ["## Federated", "",
             f"{f['clients']} clients, each with a disjoint shard of every task; {f['rounds']} round(s) of "
             f"{f['local_steps']} local steps per task; {f['aggregation']}"
             + (f" (mu {f['proximal_mu']:g})" if f["aggregation"] == "fedprox" else "")
             + " over the LoRA adapter, weighted by the clients' examples. R above scores the global model.", "",
             *markdown_table(["phase", "rounds", "clients answering (per round)", "MiB sent (both ways)"], rows), ""]
    if f.get("dp"):
        d = f["dp"]
        lines += [f"Client-level DP: each client's update clipped to {d['clipping_norm']:g}, Gaussian noise "
                  f"(multiplier {d['noise_multiplier']:g}) on the average; ({fmt(d['epsilon'], 2)}, {d['delta']:g})-DP "
                  f"for a client's whole data over {d['releases']} rounds.", ""]
    client_rows = [[f"client {c}", *[fmt(v) for v in rows_[-1]]] for c, rows_ in sorted(f["client_R"].items()) if rows_]
    if client_rows:
        lines += ["Each client's own local model after its last round (its last row of `federated.client_R`):", "",
                  *markdown_table(["", *results["tasks"]], client_rows), ""]
    return lines


def privacy_section(results: dict[str, Any]) -> list[str]:
    """DP-SGD's budget spent and the membership-inference check beside it."""
    p, m = results.get("privacy"), results.get("membership")
    lines: list[str] = []
    if p:
        target = (f"target epsilon {fmt(p['target_epsilon'], 2)} per phase" if p.get("target_epsilon") is not None
                  else f"noise multiplier {fmt(p['noise_multiplier'], 3)}")
        lines += ["## Privacy (DP-SGD)", "",
                  f"({fmt(p['epsilon'], 2)}, {p['delta']:g})-DP over the stream ({p['accountant']} accountant; "
                  f"{target}; each example's gradient clipped to {fmt(p['max_grad_norm'], 3)}).", "",
                  *markdown_table(["phase", "examples", "sample rate", "steps", "noise multiplier", "memory rate",
                                   "epsilon (own examples)"],
                                  [["+".join(ph), str(pl["examples"]), fmt(pl["sample_rate"], 4), str(pl["steps"]),
                                    fmt(pl["noise_multiplier"], 3), fmt(pl["memory_sample_rate"], 4),
                                    fmt(pl["epsilon"], 2)] for ph, pl in zip(results["phases"], p["phases"])]), "",
                  "Epsilon per task over the stream: " + ", ".join(f"{t} {fmt(e, 2)}" for t, e in
                                                                  p["task_epsilon"].items()) + ".", ""]
        if p.get("note"):
            lines += [p["note"][0].upper() + p["note"][1:] + ".", ""]
    if m:
        when = [w for w in ("base", "final") if w in m]
        names = sorted({t for w in when for t in m[w]["tasks"]})
        rows = [[t, *[fmt(m[w]["tasks"].get(t, {}).get("auc"), 3) for w in when]] for t in names]
        rows.append(["mean", *[fmt(m[w]["auc"], 3) for w in when]])
        lines += ["## Membership inference", "",
                  "Loss-threshold attack: the AUC of training examples' losses against held-out test examples' "
                  "(0.5: the losses do not tell members apart; the base model's AUC is the floor the data's own "
                  "train/test difference sets).", "",
                  *markdown_table(["task", *[f"AUC {w}" for w in when]], rows), ""]
    return lines


def probe_section(results: dict[str, Any]) -> list[str]:
    """Each general-ability probe after every phase, beside its chance level."""
    suites = (results.get("probe") or {}).get("suites") or {}
    if not suites:
        return []
    phases = ["after " + "+".join(p) for p in results["phases"]]
    rows = [[name, s["scoring"], str(s["n"]), fmt(s.get("chance")), fmt(s["base"]), *[fmt(v) for v in s["after_phase"]],
             fmt(s.get("change"), signed=True)] for name, s in suites.items()]
    return ["## General-ability probes", "", *markdown_table(["probe", "scoring", "items", "chance", "base", *phases,
                                                              "change"], rows), "",
            "A probe scored near its chance level cannot show forgetting: its drops are noise.", ""]


def forgotten_section(results: dict[str, Any], shown: int = 5) -> list[str]:
    """Items right after their task (probes: in the base model) and wrong at the end."""
    examples = results.get("examples") or {}
    if not examples:
        return []
    rows = [[name, e["then"], *[str(e["counts"][k]) for k in ("forgotten", "retained", "learned_later", "never")]]
            for name, e in examples.items()]
    lines = ["## What was forgotten, item by item", "",
             *markdown_table(["task", "right or wrong then", "forgotten", "retained", "learned later", "never"],
                             rows), "",
             "Forgotten: right then, wrong at the end; learned later: wrong then, right at the end.", ""]
    for name, e in examples.items():
        if not e["forgotten"]:
            continue
        lines += [f"**{name}**: first {min(shown, len(e['forgotten']))} of {e['counts']['forgotten']} forgotten", ""]
        lines += markdown_table(["item", "input", "gold", "answer then", "answer at the end"],
                                [[str(x["item"]), _cell(x["input"]), _cell(x["gold"]), _cell(x["then"]),
                                  _cell(x["end"])] for x in e["forgotten"][:shown]])
        lines.append("")
    return lines


def _cell(text: Any, width: int = 80) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def routing_section(results: dict[str, Any]) -> list[str]:
    """Per-task methods: scores with the task predicted from the input, next to the given-task ones."""
    routing = results.get("routing")
    if not routing:
        return []
    final = dict(zip(results["tasks"], results["R"][-1])) if results.get("R") else {}
    rows = [[t, fmt(routing["per_task_accuracy"].get(t)), fmt(final.get(t)), fmt(routing["scores"].get(t))]
            for t in routing["scores"]]
    return ["## Task-agnostic evaluation (routed by nearest task centroid)", "",
            *markdown_table(["task", "routed to it %", "score, task given", "score, task routed"], rows), "",
            f"Routing accuracy {fmt(routing['accuracy'])}%; AA with routed tasks {fmt(routing['AA'])} "
            f"(given: {fmt(results.get('metrics', {}).get('AA'))}).", ""]


def merge_section(results: dict[str, Any]) -> list[str]:
    merge = (results.get("final") or {}).get("merge")
    if not merge:
        return []
    tasks = results["tasks"]
    rows = [[m, *[fmt(v["scores"].get(t)) for t in tasks], fmt(v["AA"]), fmt(v["probe"])] for m, v in merge["methods"].items()]
    if results.get("R"):
        rows.insert(0, ["per-task adapters (task given)", *[fmt(v) for v in results["R"][-1]],
                        fmt(results["metrics"].get("AA")), fmt((results.get("probe") or {}).get("after_phase", [None])[-1])])
    return ["## Merged adapters (one adapter for every task)", "", *markdown_table(["", *tasks, "AA", "probe"], rows), ""]


def update_section(updates: list[dict[str, Any]]) -> list[str]:
    """The update analysis: size, density (float32 and bf16) and rank of dW at each measurement."""
    if not updates:
        return []
    taus = list(updates[0]["density"]["fp32"])
    rows = []
    for u in updates:
        ranks = list(u.get("rank90", {}).values())
        rows.append([str(u["global_step"]), f"{u['norm']['abs']:.4g}", f"{u['norm']['rel']:.3g}",
                     *[f"{100 * u['density'][p][t]:.2f}" for p in ("fp32", "bf16") for t in taus],
                     f"{sorted(ranks)[len(ranks) // 2]}" if ranks else "n/a",
                     fmt(u.get("kl_base"), 4), fmt(u.get("probe"))])
    header = ["step", "||dW||", "rel.", *[f"dense % {p} >{t}" for p in ("fp32", "bf16") for t in taus],
              "median rank90", "KL to base", "probe"]
    return ["## Update analysis (dW = W - W0)", "", *markdown_table(header, rows), "",
            "rank90: the number of singular values holding 90% of a matrix's update energy (median over matrices).",
            ""]


def to_html(md: str, run_dir: Path, title: str) -> str:
    """A minimal Markdown-to-HTML for the report's own subset (headings, tables, images)."""
    body, table = [], []

    def flush() -> None:
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            body.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest)
            body.append("</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            alt, rel = line[2:].split("](", 1)
            data = base64.b64encode((run_dir / rel.rstrip(")")).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(run_dir: str | Path, results: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    images = {}
    if results["R"]:
        plots.heatmap(results, run_dir / "plots" / "accuracy_matrix.png")
        plots.curves(results, run_dir / "plots" / "curves.png")
        images = {"accuracy matrix": "plots/accuracy_matrix.png", "scores after each phase": "plots/curves.png"}
    if (results.get("online") or {}).get("curve"):
        plots.online(results, run_dir / "plots" / "online.png")
        images["anytime evaluation"] = "plots/online.png"
    if results.get("updates"):
        plots.updates(results, run_dir / "plots" / "updates.png")
        images["update analysis"] = "plots/updates.png"
    md = markdown(results, images)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", to_html(md, run_dir, results["name"]))
    return run_dir / "report.md"
