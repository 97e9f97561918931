"""lm-evaluation-harness on the live model: the same items through the field's reference scorer.

``eval.harness: {tasks: [...]}`` hands the model as it is after each phase (adapters
active, routed as the probe is) to lm-eval's ``HFLM`` and records its scores next to
retain's. Task names are lm-eval tasks found under ``include_path`` (your own YAML, e.g.
reading local files: nothing may come from a hub at run time) or ``retain_<task>`` /
``retain_probe``: a choice task of this run written out as an lm-eval ``multiple_choice``
task over the very items, prompts and options retain scores. Optional: ``pip install
'retain[harness]'``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

from retain.errors import RetainError
from retain.streams.task import Task

PREFIX = "retain_"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RetainError("eval.harness needs lm-evaluation-harness: pip install 'retain[harness]' "
                          "(or pip install 'lm-eval>=0.4.9,<0.5')") from None


def write_task(task: Task, tokenizer, folder: Path, name: str | None = None) -> str:
    """``task``'s test items as an lm-eval multiple_choice task in ``folder``; returns its name.

    The context is the prompt retain renders; the options are joined to it with the task's
    answer prefix (a space for plain prompts), as retain joins them."""
    if task.metric != "choice":
        raise RetainError(f"eval.harness: task '{task.name}' is scored by {task.metric}; only choice tasks can be "
                          "handed to lm-eval as retain_<task>")
    name = name or PREFIX + task.name
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for ex in task.test:
            fh.write(json.dumps({"query": task.prompt(tokenizer, ex), "choices": list(ex.options),
                                 "gold": ex.answer_index}) + "\n")
    config = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "query",
        "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": task.prefix,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return name


class Session:
    """lm-eval for one run: the retain_<task> files are written and lm-eval's task index is
    built once (indexing its bundled tasks takes seconds), then every evaluation reuses them;
    the items do not change between phases, only the model does."""

    def __init__(self, tokenizer, names: Sequence[str], tasks: dict[str, Task], include_path: str | None = None):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self._tmp = tempfile.TemporaryDirectory(prefix="retain-harness-")
        folder = Path(self._tmp.name)
        self.names = []
        for name in names:
            if name.startswith(PREFIX):
                key = name[len(PREFIX):]
                if key not in tasks:
                    raise RetainError(f"eval.harness: '{name}' names no task of this run; valid: "
                                      + ", ".join(PREFIX + t for t in tasks))
                self.names.append(write_task(tasks[key], tokenizer, folder, name))
            else:
                self.names.append(name)
        self.tokenizer = tokenizer
        self.manager = TaskManager(include_path=[str(folder)] + ([include_path] if include_path else []))
        missing = [n for n in self.names if n not in self.manager.all_tasks]
        if missing:
            raise RetainError(f"eval.harness: lm-eval knows no task '{missing[0]}' (looked in "
                              f"{include_path or 'its own tasks'} and this run's retain_<task> tasks)")

    def evaluate(self, model, batch_size: int = 32, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """lm-eval's scores (points) of each task: acc, acc_norm and their stderr."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: adapters stay in
        lm = HFLM(pretrained=base, tokenizer=self.tokenizer, batch_size=batch_size, device=str(base.device))
        out = lm_eval.simple_evaluate(model=lm, tasks=self.names, task_manager=self.manager, limit=limit,
                                      log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
        return {name: {k.split(",")[0]: (100.0 * v if isinstance(v, float) else v)
                       for k, v in out["results"][name].items()
                       if k.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
                for name in self.names}


def evaluate(model, tokenizer, names: Sequence[str], tasks: dict[str, Task], include_path: str | None = None,
             batch_size: int = 32, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """One evaluation with a session of its own (see ``Session`` to evaluate repeatedly)."""
    return Session(tokenizer, names, tasks, include_path).evaluate(model, batch_size, limit)
