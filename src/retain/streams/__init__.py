"""Tasks, streams, loaders and the built-in offline benchmark."""

from retain.streams.builtin import BUILTIN_STREAMS, builtin_stream, probe_task
from retain.streams.loaders import load_file, load_hf, load_task
from retain.streams.task import Example, Item, Stream, Task

__all__ = [
    "BUILTIN_STREAMS", "Example", "Item", "Stream", "Task", "build_stream",
    "builtin_stream", "load_file", "load_hf", "load_task", "probe_task",
]


def build_stream(config) -> Stream:
    """The stream a run config names: a built-in one or its ``tasks`` list, plus the probe."""
    if config.stream is not None:
        stream = builtin_stream(config.stream)
    else:
        stream = Stream("custom", [load_task(spec) for spec in config.tasks])
    if config.eval.max_test:
        for task in stream.tasks:
            task.test = task.test[: config.eval.max_test]
    if config.eval.probe:
        stream.probe = probe_task(config.eval.probe_max, config.eval.probe_file, config.eval.probe_template)
    return stream
