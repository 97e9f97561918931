"""Read examples from JSONL, CSV or Hugging Face datasets, with errors that name file and line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from retain.errors import RetainError
from retain.streams.sampling import seeded_sample
from retain.streams.task import Example, Task

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _options(raw: Any, where: str, field: str) -> tuple[str, ...] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = raw.strip()
        if raw.startswith("["):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise RetainError(f"{where}: field '{field}' is not a valid JSON list") from None
        else:
            raw = [part.strip() for part in raw.split("|")]
    if not isinstance(raw, (list, tuple)) or len(raw) < 2:
        raise RetainError(f"{where}: field '{field}' must be a list of at least 2 options")
    nested = next((o for o in raw if isinstance(o, (dict, list)) or o is None), False)
    if nested is not False:
        raise RetainError(f"{where}: field '{field}' holds {_kind(nested)}; each option must be a text or a number")
    return tuple(str(o) for o in raw)


def _kind(value: Any) -> str:
    return {dict: "a JSON object", list: "a JSON list", type(None): "null"}.get(type(value), type(value).__name__)


def _text(record: dict[str, Any], name: str, where: str) -> str:
    """A field's value as text; a nested object or list is a schema the user did not map."""
    value = record[name]
    if isinstance(value, (dict, list)):
        inner = f" (its keys: {', '.join(sorted(value))})" if isinstance(value, dict) else ""
        raise RetainError(f"{where}: field '{name}' is {_kind(value)}{inner}, not text; point "
                          f"input_field/output_field at a text field")
    return str(value)


def make_example(
    record: dict[str, Any], where: str, *, input_field: str, output_field: str, options_field: str, metric: str,
    labels_field: str = "option_labels", references_field: str = "all_outputs",
) -> Example:
    """Build an Example; for ``choice`` the output may also be one of the item's own option
    labels (ARC's ``answerKey`` among ``option_labels`` "A".."E" or "1".."4"), an option
    index or a letter."""
    if not isinstance(record, dict):
        raise RetainError(f"{where}: expected an object with fields, got {type(record).__name__}")
    present = ", ".join(sorted(record)) or "none"
    required = [output_field] if metric == "perplexity" else [input_field, output_field]
    for name in required:
        if name not in record or record[name] is None:
            raise RetainError(f"{where}: missing field '{name}' (fields present: {present})")
    output = _text(record, output_field, where)
    options = _options(record.get(options_field), where, options_field)
    if metric == "choice":
        if options is None:
            raise RetainError(f"{where}: metric 'choice' needs an options list in field '{options_field}'")
        labels = _options(record.get(labels_field), where, labels_field)
        if labels is not None and len(labels) != len(options):
            raise RetainError(f"{where}: field '{labels_field}' has {len(labels)} labels for {len(options)} options")
        if output not in options:
            key = output.strip()
            if labels is not None and key in labels:
                output = options[labels.index(key)]
            elif key.isdigit() and int(key) < len(options):
                output = options[int(key)]
            elif len(key) == 1 and key.upper() in _LETTERS[: len(options)]:
                output = options[_LETTERS.index(key.upper())]
            else:
                raise RetainError(
                    f"{where}: output '{output}' is not one of the options {list(options)} "
                    "(nor an option index or letter)"
                )
    text = _text(record, input_field, where) if record.get(input_field) is not None else ""
    references = None
    refs = record.get(references_field)
    if options is None and refs is not None:
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise RetainError(f"{where}: field '{references_field}' must be a list of texts (every acceptable "
                              "answer)")
        # ``output`` first, then the other references once each.
        references = tuple(dict.fromkeys([output, *refs]))
        references = references if len(references) > 1 else None
    return Example(input=text, output=output, options=options, references=references)


def _read_text(path: Path) -> str:
    """The whole file as UTF-8; a bad byte is reported with its line, not as a traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RetainError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                          "UTF-8") from None


def _jsonl_records(path: Path) -> Iterable[tuple[str, Any]]:
    # Split on "\n" only: str.splitlines also splits on U+2028 and U+0085, which JSON strings may hold raw.
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise RetainError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None


def _csv_records(path: Path) -> Iterable[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        for row in reader:
            if None in row:
                raise RetainError(f"{path}:{reader.line_num}: more values than header columns")
            yield f"{path}:{reader.line_num}", row
    except csv.Error as exc:
        raise RetainError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def load_file(path: str | Path, **fields: str) -> list[Example]:
    """Examples of a ``.jsonl``/``.json`` (JSON Lines) or ``.csv`` file."""
    path = Path(path)
    if not path.exists():
        raise RetainError(f"data file not found: {path}")
    if not path.is_file():
        raise RetainError(f"data file {path} is not a file (a folder?); give a .jsonl, .json or .csv file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _jsonl_records(path)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise RetainError(f"{path}: unsupported data file type '{suffix}'; valid: .jsonl, .json, .csv")
    return [make_example(rec, where, **fields) for where, rec in records]


def load_hf(name: str, split: str, config_name: str | None = None, **fields: str) -> list[Example]:
    """Examples of a Hugging Face dataset split: a local ``save_to_disk`` folder or a dataset name."""
    import datasets

    try:
        if Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists():
            data = datasets.load_from_disk(name)[split]
        elif Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, config_name, split=split)
    except KeyError:
        raise RetainError(f"dataset '{name}' has no split '{split}'") from None
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise RetainError(f"dataset '{name}' (split '{split}') could not be loaded: {exc}") from None
    return [make_example(rec, f"{name}[{split}] row {i}", **fields) for i, rec in enumerate(data)]


def load_task(spec) -> Task:
    """A Task from a config ``TaskSpec``; refuses empty splits."""
    fields = dict(
        input_field=spec.input_field, output_field=spec.output_field,
        options_field=spec.options_field, metric=spec.metric,
    )
    if spec.dataset:
        train = load_hf(spec.dataset, spec.train_split, spec.dataset_config, **fields)
        test = load_hf(spec.dataset, spec.test_split, spec.dataset_config, **fields)
        sources = (f"{spec.dataset}[{spec.train_split}]", f"{spec.dataset}[{spec.test_split}]")
    else:
        train, test = load_file(spec.train, **fields), load_file(spec.test, **fields)
        sources = (spec.train, spec.test)
    for examples, source, split in ((train, sources[0], "train"), (test, sources[1], "test")):
        if not examples:
            raise RetainError(f"task '{spec.name}': {split} data {source} has no examples")
    sample = None
    if spec.max_train:
        train, _ = seeded_sample(train, spec.max_train, f"{spec.name}/train")
    if spec.max_test:
        test, sample = seeded_sample(test, spec.max_test, f"{spec.name}/test")
    return Task(
        name=spec.name,
        train=train,
        test=test,
        sample=sample,
        metric=spec.metric,
        format=spec.format,
        template=spec.template,
        # Raw text (perplexity) is scored as written, with no space before it.
        choice_norm=spec.choice_norm,
        answer_prefix=spec.answer_prefix if spec.answer_prefix is not None else ("" if spec.metric == "perplexity" else None),
    )
