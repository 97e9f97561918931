"""The field's benchmarks by name (``stream: standard-cl``) and general-ability probe suites.

Each task is a shipped dataset (``data/benchmarks/<file>.{train,test}.jsonl.gz``, compact
copies of public benchmark files; origin, commit and licence in ``data/benchmarks/SOURCES.md``)
with its prompt, metric and answer length. A stream's ``data_dir`` reads the same tasks
from a full copy in the upstream layout instead (``streams.upstream``).

Prompts of the classification tasks state the label set as O-LoRA's instructions do
("What is the topic of the content? Option: World, Sports, ..."); TRACE's and SuperNI's
inputs carry their own instruction. Choice tasks are scored by the options' log-likelihood
(the label set is closed), generated ones by their benchmark's metric.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from retain.errors import RetainError
from retain.streams.loaders import make_example
from retain.streams.task import Example, Metric, Stream, Task

Record = dict[str, Any]


@dataclass(frozen=True)
class Dataset:
    """One benchmark task: where its data is and how it is prompted and scored."""

    file: str
    metric: Metric
    #: A classification task's question; the prompt adds " Option: <labels>" and the input.
    instruction: str | None = None
    template: str = "{input}"
    choice_norm: bool = False
    max_new_tokens: int | None = None
    format: str = "plain"
    #: Rewrites a record before it becomes an Example (MMLU lists its choices in the prompt).
    render: Callable[[Record], Record] | None = None
    #: Where the task lives in the upstream layout (a folder below ``data_dir``).
    upstream: str = ""
    #: The label set, for upstream files whose records do not list it (TRACE's letters).
    options: tuple[str, ...] | None = None


@dataclass(frozen=True)
class NamedStream:
    name: str
    tasks: dict[str, Dataset]
    orders: dict[int, list[str]]
    layout: str
    description: str
    #: What the benchmark's papers report, beside AA and BWT (TRACE: OP).
    summary: str = ""
    default_order: int = field(default=0)

    def order(self, order: int | None) -> list[str]:
        chosen = self.default_order if order is None else order
        if chosen not in self.orders:
            raise RetainError(f"stream '{self.name}' has no order {chosen}; orders: "
                              + ", ".join(str(o) for o in self.orders))
        return self.orders[chosen]


# -- classification: O-LoRA / LFPT5 (standard-cl, long-cl) ---------------------------------
_TOPIC = "What is the topic of the content?"
_SENTIMENT = "What is the sentiment of the following paragraph?"
_NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"?'
_CL15: dict[str, tuple[str, str | None, str]] = {
    # task: (shipped file, instruction, O-LoRA folder under CL_Benchmark/)
    "dbpedia": ("cl15_dbpedia", _TOPIC, "TC/dbpedia"),
    "amazon": ("cl15_amazon", _SENTIMENT, "SC/amazon"),
    "yahoo": ("cl15_yahoo", _TOPIC, "TC/yahoo"),
    "agnews": ("cl15_agnews", _TOPIC, "TC/agnews"),
    "yelp": ("cl15_yelp", _SENTIMENT, "SC/yelp"),
    "imdb": ("cl15_imdb", _SENTIMENT, "SC/IMDB"),
    "sst2": ("cl15_sst2", _SENTIMENT, "SC/SST-2"),
    "mnli": ("cl15_mnli", _NLI, "NLI/MNLI"),
    "cb": ("cl15_cb", _NLI, "NLI/CB"),
    "rte": ("cl15_rte", _NLI, "NLI/RTE"),
    "qqp": ("cl15_qqp", 'Whether the "first sentence" and the "second sentence" have the same meaning?', "QQP/QQP"),
    "boolq": ("cl15_boolq", "According to the following passage, is the question true or false?", "BoolQA/BoolQA"),
    "multirc": ("cl15_multirc", "According to the following passage and question, is the candidate answer true "
                "or false?", "MultiRC/MultiRC"),
    "wic": ("cl15_wic", "Given a word and two sentences, is the word used with the same sense in both "
            "sentences?", "WiC/WiC"),
    # COPA's input already asks "Choose one between A and B." with both alternatives.
    "copa": ("cl15_copa", None, "COPA/COPA"),
}


def _cl15(name: str) -> Dataset:
    file, instruction, folder = _CL15[name]
    return Dataset(file, "choice", instruction=instruction, template="{input}\nAnswer:", upstream=folder)


STANDARD = NamedStream(
    "standard-cl", {n: _cl15(n) for n in ("dbpedia", "amazon", "yahoo", "agnews")},
    {1: ["dbpedia", "amazon", "yahoo", "agnews"], 2: ["dbpedia", "amazon", "agnews", "yahoo"],
     3: ["yahoo", "amazon", "agnews", "dbpedia"]},
    "olora", "the standard CL benchmark (O-LoRA, LFPT5): 4 text classification tasks", default_order=1)

LONG = NamedStream(
    "long-cl", {n: _cl15(n) for n in _CL15},
    {4: ["mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia", "agnews",
         "multirc", "yahoo"],
     5: ["multirc", "boolq", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yelp",
         "amazon", "yahoo"],
     6: ["yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yahoo",
         "multirc", "boolq", "wic"]},
    "olora", "the long-sequence benchmark (O-LoRA, LFPT5): 15 classification tasks (GLUE, SuperGLUE, IMDB, ...)",
    default_order=4)

# -- TRACE ---------------------------------------------------------------------------------
TRACE = NamedStream(
    "trace", {
        "cstance": Dataset("trace_cstance", "choice", upstream="C-STANCE", options=("A", "B", "C")),
        "fomc": Dataset("trace_fomc", "choice", upstream="FOMC", options=("A", "B", "C")),
        "meetingbank": Dataset("trace_meetingbank", "rouge_l", max_new_tokens=128, upstream="MeetingBank"),
        "py150": Dataset("trace_py150", "edit_similarity", max_new_tokens=32, upstream="Py150"),
        # The answer is the letter, then an explanation: the letter is scored.
        "scienceqa": Dataset("trace_scienceqa", "choice_letter", max_new_tokens=8, upstream="ScienceQA"),
        "numglue-cm": Dataset("trace_numglue_cm", "number", max_new_tokens=12, upstream="NumGLUE-cm"),
        "numglue-ds": Dataset("trace_numglue_ds", "number", max_new_tokens=12, upstream="NumGLUE-ds"),
        "20minuten": Dataset("trace_20minuten", "sari", max_new_tokens=128, upstream="20Minuten"),
    },
    {1: ["cstance", "fomc", "meetingbank", "py150", "scienceqa", "numglue-cm", "numglue-ds", "20minuten"]},
    "trace", "TRACE: 8 tasks (stance, finance, summarization, code, science QA, math, German simplification)",
    summary="OP = mean final score over the tasks (TRACE's overall performance), BWT", default_order=1)

# -- SuperNI (SAPT) ------------------------------------------------------------------------
_SUPERNI = {
    "task1572": ("task1572_samsum_summary", 96), "task363": ("task363_sst2_polarity_classification", 8),
    "task1290": ("task1290_xsum_summarization", 64), "task181": ("task181_outcome_extraction", 32),
    "task002": ("task002_quoref_answer_generation", 16), "task1510": ("task1510_evalution_relation_extraction", 16),
    "task639": ("task639_multi_woz_user_utterance_generation", 48),
    "task1729": ("task1729_personachat_generate_next", 48),
    "task073": ("task073_commonsenseqa_answer_generation", 8), "task1590": ("task1590_diplomacy_text_generation", 96),
    "task748": ("task748_glucose_reverse_cause_event_detection", 48),
    "task511": ("task511_reddit_tifu_long_text_summarization", 64),
    "task591": ("task591_sciq_answer_generation", 16), "task1687": ("task1687_sentiment140_classification", 8),
    "task875": ("task875_emotion_classification", 8),
}


def _superni(record: Record) -> Record:
    """SuperNI's prompt: the task's definition, then the instance (as SAPT's Definition + input)."""
    return {**record, "input": f"Definition: {record.get('instruction', '')}\n\nInput: {record['input']}"}


SUPERNI = NamedStream(
    "superni-cl", {n: Dataset(f"superni_{n}", "rouge_l", template="{input}\nOutput:", max_new_tokens=tokens,
                              render=_superni, upstream=f"SuperNI/{full}")
                   for n, (full, tokens) in _SUPERNI.items()},
    {1: ["task1572", "task363", "task1290", "task181", "task002", "task1510", "task639", "task1729", "task073",
         "task1590", "task748", "task511", "task591", "task1687", "task875"],
     2: ["task1687", "task363", "task875", "task073", "task591", "task002", "task1290", "task1572", "task511",
         "task181", "task748", "task1510", "task639", "task1590", "task1729"]},
    "superni", "SuperNI: 15 instruction tasks of Super-NaturalInstructions (SAPT's orders), ROUGE-L",
    default_order=1)

NAMED_STREAMS: dict[str, NamedStream] = {s.name: s for s in (STANDARD, LONG, TRACE, SUPERNI)}


# -- general-ability probes ----------------------------------------------------------------
def _hellaswag_text(text: str) -> str:
    # HellaSwag's WikiHow contexts carry bracketed headers ("[title]"), cleaned as lm-evaluation-harness does.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(record: Record) -> Record:
    label = record.get("activity_label", "")
    return {**record, "input": _hellaswag_text(f"{label}: {record['input']}"),
            "options": [_hellaswag_text(o) for o in record["options"]]}


def _mmlu(record: Record) -> Record:
    """MMLU as lm-evaluation-harness asks it: the choices listed, the letter scored."""
    subject = record.get("subject", "").replace("_", " ")
    letters = "ABCD"[: len(record["options"])]
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, record["options"]))
    return {"input": f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                     f"{record['input'].strip()}\n{choices}",
            "output": record["output"], "options": list(letters)}


def _boolq(record: Record) -> Record:
    """BoolQ as a yes/no question after its passage (lm-evaluation-harness's prompt)."""
    question, _, passage = record["input"].partition("\npassage: ")
    question = question.removeprefix("question: ").strip()
    return {"input": f"{passage.strip()}\nQuestion: {question}?",
            "output": "yes" if record["output"] == "True" else "no", "options": ["no", "yes"]}


_QUESTION = "Question: {input}\nAnswer:"
PROBES: dict[str, Dataset] = {
    "mmlu": Dataset("probe_mmlu", "choice", template="{input}\nAnswer:", render=_mmlu),
    "arc-easy": Dataset("probe_arc_easy", "choice", template=_QUESTION, choice_norm=True),
    "arc-challenge": Dataset("probe_arc_challenge", "choice", template=_QUESTION, choice_norm=True),
    "hellaswag": Dataset("probe_hellaswag", "choice", choice_norm=True, render=_hellaswag),
    "piqa": Dataset("probe_piqa", "choice", template=_QUESTION, choice_norm=True),
    "csqa": Dataset("probe_csqa", "choice", template=_QUESTION),
    "boolq": Dataset("probe_boolq", "choice", template="{input}\nAnswer:", render=_boolq),
    "gsm8k": Dataset("gsm8k", "number", format="chat", max_new_tokens=256),
}
#: The probe that ``eval.probe: true`` scores: the suites the embedded 135M model answers
#: clearly above chance (measured: benchmarks/results/probes.md). MMLU is at chance for it.
DEFAULT_PROBES = ("arc-easy", "piqa", "hellaswag")
#: The probe the project shipped first: facts the base model answers right, so it can only fall.
FACTS = "facts"
PROBE_NAMES = (*PROBES, FACTS)
_FILES = {"probe_boolq": "cl15_boolq"}


def _shipped(file: str, split: str) -> list[tuple[str, Record]]:
    name = f"{_FILES.get(file, file)}.{split}.jsonl.gz"
    ref = resources.files("retain.streams").joinpath(f"data/benchmarks/{name}")
    if not ref.is_file():
        raise RetainError(f"shipped benchmark file {name} is missing from the retain package (a broken install?)")
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        return [(f"{name}:{i}", json.loads(line)) for i, line in enumerate(text.read().split("\n"), 1) if line.strip()]


def _examples(dataset: Dataset, rows: list[tuple[str, Record]]) -> list[Example]:
    render = dataset.render or (lambda r: r)
    return [make_example(render(rec), where, input_field="input", output_field="output", options_field="options",
                         metric=dataset.metric) for where, rec in rows]


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def make_task(name: str, dataset: Dataset, train: list[Example], test: list[Example]) -> Task:
    template = dataset.template
    if dataset.instruction is not None:
        labels = ", ".join(test[0].options or ()) if test else ""
        template = f"{_escape(dataset.instruction)} Option: {_escape(labels)}\n{template}"
    return Task(name, train, test, metric=dataset.metric, template=template, format=dataset.format,
                choice_norm=dataset.choice_norm, max_new_tokens=dataset.max_new_tokens)


def named_stream(name: str, order: int | None = None, data_dir: str | None = None) -> Stream:
    """A benchmark's tasks in one of its published orders, from the shipped copies or ``data_dir``."""
    spec = NAMED_STREAMS[name]
    names = spec.order(order)
    tasks = []
    for task in names:
        dataset = spec.tasks[task]
        if data_dir is None:
            splits = [_examples(dataset, _shipped(dataset.file, s)) for s in ("train", "test")]
        else:
            from retain.streams.upstream import read_upstream

            splits = [_examples(dataset, rows) for rows in read_upstream(spec.layout, data_dir, dataset)]
        tasks.append(make_task(task, dataset, *splits))
    return Stream(name, tasks, description=spec.description,
                  order=spec.default_order if order is None else order)


def probe_suite(name: str) -> Task:
    """A named general-ability probe: its test split, prompted and scored as lm-evaluation-harness does."""
    dataset = PROBES[name]
    return make_task(name, dataset, [], _examples(dataset, _shipped(dataset.file, "test")))


def stream_sizes(name: str) -> dict[str, tuple[int, int]]:
    """Train and test items per task of the shipped copy (for ``retain list``)."""
    out = {}
    for task, dataset in NAMED_STREAMS[name].tasks.items():
        out[task] = tuple(len(_shipped(dataset.file, s)) for s in ("train", "test"))
    return out
