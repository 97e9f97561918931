"""``retain export RUN OUT``: hand a run's models to tools that know nothing of ``retain``.

OUT holds, as the run allows:

- ``adapters/<name>/``: every LoRA adapter as a standard PEFT folder (``PeftModel.from_pretrained``);
- ``model/``: one full model in Hugging Face safetensors with its tokenizer, loadable by plain
  transformers: the adapter given by ``--merge`` (default: the one the run ends with) merged into
  the base by PEFT's ``merge_and_unload``, or the trained weights of a fully fine-tuned run;
- ``base/``: the base model as safetensors when the run's base is not already a Hugging Face
  folder or hub id (the embedded GGUF model, say), so a server can load it next to the adapters;
- ``vllm.json``: the ``vllm serve`` command line that serves the base with every adapter
  (``--enable-lora --lora-modules name=path ... --max-lora-rank R``);
- ``router.json``: the task router (task names, centroids, how inputs are embedded), for a
  proxy that routes requests to the adapters the way ``retain serve`` does with ``auto``;
- ``mergekit/<method>.yaml``: a mergekit config per merge method with a mergekit counterpart;
- ``README.md``: a model card with the run's R, metrics, probe and their 95% intervals.

OUT is written to a temporary folder and renamed when complete: a failed export leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from retain.errors import RetainError
from retain.handover import FINAL, HandedOver, adapter_folders, load, peft_model
from retain.io import atomic_write_dir

#: retain's merge methods (PEFT ``add_weighted_adapter``) -> mergekit's merge_method. PEFT's
#: ``cat`` is the exact weighted sum of the updates, which is mergekit's ``linear`` on full
#: models; PEFT's ``linear`` averages A and B separately and has no mergekit counterpart.
MERGEKIT = {"cat": "linear", "ties": "ties", "dare_ties": "dare_ties", "dare_linear": "dare_linear",
            "magnitude_prune": "ties"}


def refusal(handed: HandedOver) -> str | None:
    reasons = [f"{s.name}: {s.not_exportable}" for s in handed.stack.strategies if s.not_exportable]
    return "; ".join(reasons) or None


def base_location(handed: HandedOver) -> str | None:
    """Where a server finds the base model: the run's own spec when it is a HF folder or hub id."""
    from retain.models import resolve_model_spec

    kind, location = resolve_model_spec(handed.ctx.config.model)
    return location if kind in ("dir", "hub") else None


def default_merge(handed: HandedOver) -> str:
    """The adapter the run ends with (the one its probe was scored with)."""
    peft = peft_model(handed.ctx.accelerator.unwrap_model(handed.ctx.model))
    with handed.offer(FINAL).use():
        active = peft.active_adapter
    return active if isinstance(active, str) else active[0]


def export(run_dir: str | Path, out: str | Path, *, merge: str | None = None, full_model: bool = True,
           overwrite: bool = False) -> dict[str, Any]:
    """Write OUT (see the module docstring); returns the manifest written to ``OUT/export.json``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RetainError(f"{out} already exists; pick another folder or pass --overwrite")
    handed = load(run_dir)
    reason = refusal(handed)
    if reason:
        raise RetainError(f"{run_dir} cannot be exported: {reason}. `retain serve {run_dir}` serves it as it is")
    if full_model and handed.ctx.config.model_quantization:
        raise RetainError(f"{run_dir} trained on a {handed.ctx.config.model_quantization} base: merging the adapter "
                          "into k-bit weights would quantize the merged model again; pass --no-model and load the "
                          "exported adapters on the full-precision base")
    model = handed.ctx.accelerator.unwrap_model(handed.ctx.model)
    peft = peft_model(model)
    folders = adapter_folders(handed.run_dir) if peft is not None else {}
    if merge is not None:
        if peft is None:
            raise RetainError(f"--merge {merge}: run {run_dir} trained the model's own weights; it has no adapters "
                              "to merge (its model/ is the trained model)")
        if merge not in peft.peft_config:
            raise RetainError(f"--merge {merge}: no such adapter; adapters of this run: "
                              f"{', '.join(sorted(peft.peft_config))}")
    chosen = (merge or default_merge(handed)) if peft is not None else None
    manifest: dict[str, Any] = {"run": str(handed.run_dir), "name": handed.results["name"],
                                "strategy": handed.results["strategy"], "base_model": handed.ctx.config.model}

    def write(tmp: Path) -> None:
        tok = handed.ctx.tokenizer
        if folders:
            for name, folder in folders.items():
                shutil.copytree(folder, tmp / "adapters" / name)
            manifest["adapters"] = {n: f"adapters/{n}" for n in folders}
            base = base_location(handed)
            if base is None:
                write_base(handed, tmp / "base")
                base = "base"
            manifest["base"] = base
            manifest["vllm"] = vllm_manifest(base, folders, tmp)
            atomic_json(tmp / "vllm.json", manifest["vllm"])
            merges = mergekit_configs(handed, base, folders)
            for method, config in merges.items():
                (tmp / "mergekit").mkdir(exist_ok=True)
                (tmp / "mergekit" / f"{method}.yaml").write_text(config, encoding="utf-8")
            manifest["mergekit"] = {m: f"mergekit/{m}.yaml" for m in merges}
        if handed.router is not None:
            atomic_json(tmp / "router.json", router_file(handed, folders))
            manifest["router"] = "router.json"
        if full_model:
            if peft is not None:
                peft.set_adapter(chosen)
                merged = peft.merge_and_unload(adapter_names=[chosen])
                manifest["model"] = {"path": "model", "merged_adapter": chosen}
            else:
                merged = model
                manifest["model"] = {"path": "model", "merged_adapter": None}
            merged.save_pretrained(tmp / "model", safe_serialization=True)
            tok.save_pretrained(tmp / "model")
        (tmp / "README.md").write_text(model_card(handed, manifest), encoding="utf-8")
        atomic_json(tmp / "export.json", manifest)

    atomic_write_dir(out, write)
    return manifest


def atomic_json(path: Path, data: Any) -> None:
    # Inside the export's temporary folder: the folder's rename makes the whole export atomic.
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_base(handed: HandedOver, dest: Path) -> None:
    """The base model as loaded for the run (de-quantized GGUF, tiny random) in safetensors."""
    from retain.models import load_model

    config = handed.ctx.config
    base, tok = load_model(config.model, trust_remote_code=config.trust_remote_code, seed=config.seed)
    base.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)


#: The values vLLM accepts for --max-lora-rank (it sizes its LoRA kernels by them).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_manifest(base: str, folders: dict[str, Path], out: Path) -> dict[str, Any]:
    ranks = [json.loads((out / "adapters" / n / "adapter_config.json").read_text())["r"] for n in folders]
    rank = next((r for r in VLLM_RANKS if r >= max(ranks)), max(ranks))
    modules = {n: f"adapters/{n}" for n in folders}
    command = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(rank), "--max-loras",
               str(len(folders)), "--lora-modules", *[f"{n}={p}" for n, p in modules.items()]]
    return {"base_model": base, "lora_modules": modules, "max_lora_rank": rank,
            "adapter_ranks": dict(zip(folders, ranks)), "max_loras": len(folders),
            "command": command, "note": "paths are relative to this folder: run the command from here"}


def router_file(handed: HandedOver, folders: dict[str, Path]) -> dict[str, Any]:
    router = handed.router
    config = handed.ctx.config
    return {
        "tasks": list(router.centroids), "adapters": {t: f"adapters/{t}" for t in router.centroids if t in folders},
        "centroids": [router.centroids[t].tolist() for t in router.centroids],
        "embedding": {"model": "the base model (every adapter off)", "pooling": "mean of the last hidden state over "
                      "the input's tokens, L2-normalized", "special_tokens": True,
                      "max_length": config.train.max_length},
        "rule": "the task whose centroid has the largest dot product with the input's embedding",
    }


def mergekit_configs(handed: HandedOver, base: str, folders: dict[str, Path]) -> dict[str, str]:
    """One mergekit config per merge method the run scores (or would score) with a mergekit counterpart."""
    tasks = [t for t in handed.ctx.stream.task_names if t in folders]
    if len(tasks) < 2:
        return {}
    options = handed.ctx.config.options("merge") if "merge" in handed.stack.name.split("+") else None
    methods = list(getattr(options, "methods", None) or ["cat", "ties"])
    density = getattr(options, "density", 0.5)
    out = {}
    for method in methods:
        if method not in MERGEKIT:
            continue
        trimming = method != "cat"
        weights = getattr(options, "weights", None) or [1.0 if trimming else 1.0 / len(tasks)] * len(tasks)
        models = [{"model": f"{base}+adapters/{t}", "parameters": {"weight": w, **({"density": density}
                                                                                 if trimming else {})}}
                  for t, w in zip(tasks, weights)]
        config = {"merge_method": MERGEKIT[method], "base_model": base, "models": models, "dtype": "float32"}
        if MERGEKIT[method] == "linear":
            config.pop("base_model")
            config["parameters"] = {"normalize": False}
        out[method] = (f"# mergekit-yaml {method}.yaml merged-{method}   (from this export folder)\n"
                       f"# retain's '{method}' merge of the task adapters of run {handed.results['name']}\n"
                       + yaml.safe_dump(config, sort_keys=False))
    return out


def model_card(handed: HandedOver, manifest: dict[str, Any]) -> str:
    from retain.reporting.report import METRIC_HEADER, fmt, markdown_table, metric_rows

    r = handed.results
    R = [["base", *[fmt(v) for v in r["base"]]]]
    R += [["after " + "+".join(p), *[fmt(v) for v in row]] for p, row in zip(r["phases"], r["R"])]
    library = "peft" if manifest.get("adapters") else "transformers"
    front = {"library_name": library, "base_model": manifest.get("base", r.get("model")),
             "tags": ["retain", "continual-learning", r["strategy"]]}
    suites = (r.get("probe") or {}).get("suites") or {}
    probe_rows = [[name, fmt(s.get("base")), fmt((s.get("after_phase") or [None])[-1]),
                   fmt(s.get("chance"))] for name, s in suites.items()]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {r['name']}: `{r['strategy']}` on `{r['stream']}`", "",
             f"Trained with `retain` on {len(r['tasks'])} tasks in order: {', '.join(r['tasks'])}; base model "
             f"`{r.get('model', manifest['base_model'])}`, seed {r.get('seed')}.", "",
             "## What it scores", "", "R[i][j]: score on task j after training through phase i.", "",
             *markdown_table(["", *r["tasks"]], R), "",
             *markdown_table(METRIC_HEADER, metric_rows(r)), "",
             "In brackets: 95% intervals (bootstrap over test items) where the run recorded them."]
    if probe_rows:
        lines += ["", "General-ability probes (base model → end of stream):", "",
                  *markdown_table(["probe", "base", "final", "chance"], probe_rows)]
    lines += ["", "## Contents", ""]
    if manifest.get("adapters"):
        lines += [f"- `adapters/`: {', '.join(manifest['adapters'])} (PEFT LoRA folders)",
                  f"- base model: `{manifest['base']}`", "- `vllm.json`: the `vllm serve` command for all adapters"]
    if manifest.get("model"):
        merged = manifest["model"]["merged_adapter"]
        lines.append("- `model/`: full model in safetensors" + (f", adapter `{merged}` merged in" if merged else ""))
    if manifest.get("router"):
        lines.append("- `router.json`: task centroids for routing inputs to adapters")
    for method, path in (manifest.get("mergekit") or {}).items():
        lines.append(f"- `{path}`: mergekit config for the `{method}` merge")
    lines += ["", "## Load it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if manifest.get("model"):
        lines += ['model = AutoModelForCausalLM.from_pretrained("model")',
                  'tokenizer = AutoTokenizer.from_pretrained("model")']
    if manifest.get("adapters"):
        first = next(iter(manifest["adapters"]))
        lines += ["from peft import PeftModel", f'base = AutoModelForCausalLM.from_pretrained("{manifest["base"]}")',
                  f'tuned = PeftModel.from_pretrained(base, "adapters/{first}")']
    lines += ["```", ""]
    return "\n".join(lines)
