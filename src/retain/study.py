"""A study: several runs (arms) of one question, run in turn, reported side by side.

``retain study STUDY.yaml`` runs every arm not finished yet (a killed arm resumes), then
writes ``<output_dir>/<name>/study.md`` with the figures that compare how each arm moved
the weights and what it cost: target score and probe against step, probe against ||dW||,
the density and rank of each arm's final update, and each arm's ||dW|| at matched target
score. Arms need ``analysis.enabled``. ``export`` copies the report with each arm's
results.json into another folder (a study's results to commit or share, without the
arms' checkpoints and weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retain.config import format_errors, load_config, read_yaml
from retain.errors import RetainError
from retain.io import atomic_write_json, atomic_write_text


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str
    name: str | None = None
    set: list[str] = Field(default_factory=list, description="key=value overrides of the arm's config")


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")
    output_dir: str = "runs"
    arms: list[Arm] = Field(min_length=1)
    set: list[str] = Field(default_factory=list, description="key=value overrides of every arm's config "
                           "(an arm's own set wins), e.g. a study-wide train.max_steps")

    @field_validator("arms", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return [{"config": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v


def load_study(path: str | Path, overrides: list[str] | None = None,
               name: str | None = None) -> tuple[Study, list]:
    """The study and each arm's validated run config (written under the study's folder).

    ``overrides`` (key=value) apply to every arm, after the study's and the arm's own
    ``set``; ``name`` replaces the study's, so a variant (fewer steps) gets its own folder
    instead of colliding with the finished arms of the original."""
    path = Path(path)
    try:
        study = Study.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise RetainError(f"{path}: {format_errors(exc, model=Study)}") from None
    if name is not None:
        try:
            study = Study.model_validate({**study.model_dump(), "name": name})
        except ValidationError:
            raise RetainError(f"study name {name!r}: use letters, digits and _ . + - only") from None
    folder = Path(study.output_dir) / study.name
    configs, names = [], set()
    for i, arm in enumerate(study.arms):
        source = Path(arm.config) if Path(arm.config).is_absolute() else path.parent / arm.config
        if not source.is_file() and Path(arm.config).is_file():
            source = Path(arm.config)  # relative to the working directory
        extra = [f"output_dir={folder}"] + ([f"name={arm.name}"] if arm.name else [])
        try:
            cfg = load_config(source, study.set + arm.set + list(overrides or []) + extra)
        except RetainError as exc:  # the bad key may come from the study's set, not the arm's file
            raise RetainError(f"{path}: arms[{i}]: {exc}") from None
        if cfg.name in names:
            raise RetainError(f"{path}: arms[{i}]: two arms are named '{cfg.name}'; give one a 'name'")
        if not cfg.analysis.enabled:
            raise RetainError(f"{path}: arms[{i}] ({cfg.name}): a study compares updates; set analysis.enabled: true")
        names.add(cfg.name)
        configs.append(cfg)
    return study, configs


def run_study(path: str | Path, quiet: bool = False, overrides: list[str] | None = None,
              name: str | None = None, export: Path | None = None, ray=None) -> Path:
    """Run each unfinished arm (resuming a killed one), then write the study report (and
    its exported copy, when ``export`` names a folder). With ``ray`` (``dispatch.RayOptions``)
    every unfinished arm, and every seed of an arm with seeds, trains at once as a Ray task."""
    from retain.loop import execute, run_dir_for
    from retain.reporting import load_results
    from retain.seeds import prepare_seeds, run_seeds, seed_dir

    study, configs = load_study(path, overrides, name)
    folder = Path(study.output_dir) / study.name
    if export is not None:  # checked now: a study runs for hours before it exports
        if Path(export).resolve() == folder.resolve():
            raise RetainError(f"--export {export}: that is the study's own folder; name another")
        if Path(export).exists() and not Path(export).is_dir():
            raise RetainError(f"--export {export}: a file is there; name a folder (new or existing)")
    for cfg in configs:  # before any arm runs: a mismatch found late would leave the study half-done
        check_arm_folder(run_dir_for(cfg), cfg)
    if ray is not None:
        from retain.dispatch import Job, announce, connected, dispatch
        from retain.loop import check_run
        from retain.ui import UI

        for cfg in configs:
            check_run(cfg)
        with connected(ray):
            jobs = []
            for cfg in configs:
                run_dir = run_dir_for(cfg)
                jobs += prepare_seeds(cfg, run_dir, resume=run_dir.exists()) if cfg.seeds else [Job(cfg, run_dir)]
            records = dispatch(jobs, ray, announce(UI(quiet=quiet), jobs, ray))  # the loop below reads the results
        if records:
            atomic_write_json(folder / "dispatch.json", records)
    results, run_dirs = [], []
    for cfg in configs:
        run_dir = run_dir_for(cfg)
        if cfg.seeds:
            # An arm with seeds: one row per seed (named arm/seed-s), the arm's aggregate in its folder.
            run_seeds(cfg, run_dir=run_dir, resume=run_dir.exists(), quiet=quiet)
            for seed in cfg.seeds:
                r = load_results(seed_dir(run_dir, seed))
                results.append({**r, "name": f"{cfg.name}/seed-{seed}"})
                run_dirs.append(seed_dir(run_dir, seed))
            continue
        run_dirs.append(run_dir)
        if (run_dir / "results.json").is_file():
            results.append(load_results(run_dir))
            continue
        resume = (run_dir / "checkpoints" / "state.json").is_file()
        results.append(execute(cfg, run_dir=run_dir, resume=resume, quiet=quiet, overwrite=not resume))
    report = write_study(folder, study.name, results)
    if export is not None:
        export_study(Path(export), study.name, results, run_dirs)
    return report


def export_study(dest: Path, name: str, results: list[dict[str, Any]], run_dirs: list[Path]) -> Path:
    """The report, its plot and each arm's results.json as ``<arm>.json`` in ``dest``; the
    report's arm links point at those copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for r, run_dir in zip(results, run_dirs):
        target = dest / f"{r['name']}.json"
        target.parent.mkdir(parents=True, exist_ok=True)  # arm/seed-s.json for an arm with seeds
        shutil.copyfile(run_dir / "results.json", target)
    return write_study(dest, name, results, link=lambda arm: f"{arm}.json")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_arm_folder(run_dir: Path, cfg) -> None:
    """An arm's folder from an earlier study must hold the same run, or the study would
    silently report (or resume) a run of other settings, e.g. one of fewer steps."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(read_yaml(saved_path))
    wanted = _flatten(cfg.resolved())
    # Keys the saved config lacks are options added since it ran; they keep their defaults.
    changed = [k for k in wanted if k in saved and saved[k] != wanted[k]]
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more keys)" if len(changed) > 1 else ""
        raise RetainError(
            f"{run_dir} holds arm '{cfg.name}' run with {key}={saved[key]!r}, but the study now asks "
            f"{key}={wanted[key]!r}{more}; delete or move that folder to run the arm again, or give "
            "the study another name (retain study --name) or output_dir")


def final_update(r: dict[str, Any]) -> dict[str, Any]:
    return r["updates"][-1] if r.get("updates") else {}


def seconds_per_update(r: dict[str, Any]) -> float | None:
    """Training seconds per step, without the analysis measured inside the phases (about a
    minute per record on CPU), so arms with more records do not look slower."""
    phase_steps = [t["steps"] for t in r.get("timings", [])]
    if not sum(phase_steps):
        return None
    inside = sum(u.get("seconds", 0.0) for u in r.get("updates", [])
                 if u["phase"] < len(phase_steps) and u["step"] < phase_steps[u["phase"]])
    return (sum(t["train_s"] for t in r["timings"]) - inside) / sum(phase_steps)


def study_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    from retain.reporting.report import fmt

    taus = list(final_update(results[0]).get("density", {}).get("fp32", {})) if results else []
    header = ["arm", "strategy", "target base", "target final", "probe base", "probe final", "||dW||", "rel.",
              *[f"dense % {p} >{t}" for p in ("fp32", "bf16") for t in taus], "median rank90", "KL to base",
              "s per update"]
    rows = []
    for r in results:
        u = final_update(r)
        ranks = sorted(u.get("rank90", {}).values())
        target_base = sum(r["base"]) / len(r["base"])
        target = sum(r["R"][-1]) / len(r["R"][-1]) if r["R"] else None
        probe = r.get("probe") or {}
        rows.append([r["name"], r["strategy"], fmt(target_base), fmt(target), fmt(probe.get("base")),
                     fmt((probe.get("after_phase") or [None])[-1]),
                     f"{u['norm']['abs']:.4g}" if u else "n/a", f"{u['norm']['rel']:.3g}" if u else "n/a",
                     *[f"{100 * u['density'][p][t]:.2f}" if u else "n/a" for p in ("fp32", "bf16") for t in taus],
                     str(ranks[len(ranks) // 2]) if ranks else "n/a", fmt(u.get("kl_base"), 4),
                     fmt(seconds_per_update(r), 1)])
    return header, rows


def matched_rows(results: list[dict[str, Any]], step: float = 10.0) -> tuple[list[str], list[list[str]]]:
    """Each arm's update when it first reached each score level, from its analysis records.

    Final figures compare arms that learned different amounts; a method's forgetting is
    only comparable at the same target score, so levels go up in ``step`` points from above
    the lowest base score to the highest score any record reached."""
    import math

    from retain.reporting.report import fmt
    from retain.reporting.results import scored_records

    records = {r["name"]: scored_records(r) for r in results}
    reached = [s for recs in records.values() for s, _ in recs]
    if not reached:
        return [], []
    base = min(sum(r["base"]) / len(r["base"]) for r in results)
    levels = [step * k for k in range(math.floor(base / step) + 1, math.floor(max(reached) / step) + 1)]
    header = ["score reached", *(r["name"] for r in results)]
    rows = []
    for level in levels:
        cells = [f">= {level:g}"]
        for r in results:
            hit = next(((s, u) for s, u in records[r["name"]] if s >= level), None)
            cells.append("not reached" if hit is None else
                         f"{hit[1]['norm']['rel']:.2g} at step {hit[1]['global_step']} "
                         f"(score {hit[0]:.0f}, probe {fmt(hit[1].get('probe'))})")
        rows.append(cells)
    return header, rows


def write_study(folder: Path, name: str, results: list[dict[str, Any]],
                link: Callable[[str], str] = lambda arm: f"{arm}/report.md") -> Path:
    from retain.reporting import plots
    from retain.reporting.report import markdown_table

    plots.study(results, folder / "study.png")
    header, rows = study_rows(results)
    matched = matched_rows(results)
    md = "\n".join([
        f"# Study {name}", "",
        "Target: mean score over the stream's tasks. Probe: the general-ability questions. "
        "||dW||: Frobenius norm of the final update; rel.: divided by ||W0||. Density: percent of "
        "weights changed by more than tau, in float32 and after casting to bf16. rank90: singular "
        "values holding 90% of a matrix's update energy (median over matrices). s per update: "
        "training seconds per step, without the update analysis.", "",
        *markdown_table(header, rows), "",
        *(["## At matched target score", "",
            "||dW||/||W0|| of each arm's update at the first analysis record that reached the score "
            "(its step, the score it had there and the probe then).", "",
            *markdown_table(*matched), ""] if matched[1] else []),
        "![study](study.png)", "",
        "Arms: " + ", ".join(f"[{r['name']}]({link(r['name'])})" for r in results), "",
    ])
    atomic_write_text(folder / "study.md", md)
    return folder / "study.md"
