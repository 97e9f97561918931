"""Tasks, streams, loaders, the built-in synthetic streams, the field's named benchmarks and probes."""

from retain.streams.benchmarks import NAMED_STREAMS, PROBES as NAMED_PROBES, named_stream, probe_suite
from retain.streams.builtin import BUILTIN_STREAMS, builtin_stream, probe_task
from retain.streams.loaders import load_file, load_hf, load_task
from retain.streams.sampling import Sample, seeded_sample
from retain.streams.task import Example, Item, Stream, Task

__all__ = [
    "BUILTIN_STREAMS", "NAMED_STREAMS", "Example", "Item", "Sample", "Stream", "Task", "build_stream",
    "builtin_stream", "load_file", "load_hf", "load_task", "named_stream", "probe_suite", "probe_task", "probes",
    "seeded_sample",
]


def probes(config) -> list[Task]:
    """The general-ability probes ``eval`` names, each capped by ``probe_max``."""
    cfg = config.eval
    out = []
    for name in cfg.probe_names():
        if name in NAMED_PROBES:
            task = probe_suite(name)
        else:
            task = probe_task(None, cfg.probe_file if name == "custom" else None, cfg.probe_template)
            task.name, task.choice_norm = name, cfg.probe_choice_norm
        if cfg.probe_max:
            task.test, task.sample = seeded_sample(task.test, cfg.probe_max, f"{name}/test", cfg.sample_seed)
        out.append(task)
    return out


def build_stream(config) -> Stream:
    """The stream a run config names: a built-in or named one, or its ``tasks`` list, plus the probes."""
    spec = config.stream
    seed = config.eval.sample_seed
    if spec is not None and spec.name in NAMED_STREAMS:
        stream = named_stream(spec.name, spec.order, spec.data_dir)
        for task in stream.tasks:
            if spec.max_train:
                task.train, _ = seeded_sample(task.train, spec.max_train, f"{task.name}/train", seed)
            if spec.max_test:
                task.test, task.sample = seeded_sample(task.test, spec.max_test, f"{task.name}/test", seed)
    elif spec is not None:
        stream = builtin_stream(spec.name)
    else:
        stream = Stream("custom", [load_task(s) for s in config.tasks])
    if config.eval.max_test:
        for task in stream.tasks:
            task.test, task.sample = seeded_sample(task.test, config.eval.max_test, f"{task.name}/test", seed)
    stream.probes = probes(config)
    return stream
