"""Tasks, streams, loaders and the built-in offline benchmark."""

from retain.streams.builtin import BUILTIN_STREAMS, builtin_stream, probe_task
from retain.streams.loaders import load_file, load_hf, load_task
from retain.streams.sampling import Sample, seeded_sample
from retain.streams.task import Example, Item, Stream, Task

__all__ = [
    "BUILTIN_STREAMS", "Example", "Item", "Sample", "Stream", "Task", "build_stream", "seeded_sample",
    "builtin_stream", "load_file", "load_hf", "load_task", "probe_task",
]


def build_stream(config) -> Stream:
    """The stream a run config names: a built-in one or its ``tasks`` list, plus the probe."""
    if config.stream is not None:
        stream = builtin_stream(config.stream)
    else:
        stream = Stream("custom", [load_task(spec) for spec in config.tasks])
    seed = config.eval.sample_seed
    if config.eval.max_test:
        for task in stream.tasks:
            task.test, task.sample = seeded_sample(task.test, config.eval.max_test, f"{task.name}/test", seed)
    if config.eval.probe:
        stream.probe = probe_task(None, config.eval.probe_file, config.eval.probe_template)
        stream.probe.choice_norm = config.eval.probe_choice_norm
        if config.eval.probe_max:
            stream.probe.test, stream.probe.sample = seeded_sample(stream.probe.test, config.eval.probe_max,
                                                                   "probe/test", seed)
    return stream
