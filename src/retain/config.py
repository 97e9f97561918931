"""The run config: typed, validated, loaded from YAML with ``key=value`` overrides.

Strategy options live in top-level sections named after the strategy's ``options_key``
(``lora:``, ``replay:``); a strategy declares its own options model, so adding a method
needs no edit here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retain.errors import RetainError
from retain.streams.task import Metric


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Task names become folder and adapter names (PEFT refuses '.' in an adapter's name).
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
#: Run names become a folder under ``output_dir``: no separators, no leading dot.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _name_rule(what: str, pattern: re.Pattern, chars: str, names: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} name '{value}' may hold only letters, digits, {chars} and must start "
                             f"with a letter or digit (it names {names})")
        return value
    return AfterValidator(check)


TaskName = Annotated[str, _name_rule("task", TASK_NAME, "'-' and '_'", "the task's folders and adapters")]
RunName = Annotated[str, _name_rule("run", RUN_NAME, "'.', '+', '-' and '_'", "the run's folder")]


class TaskSpec(_Strict):
    """One task of a user-defined stream: files (JSONL/CSV) or a Hugging Face dataset."""

    name: TaskName
    train: str | None = None
    test: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    metric: Metric = Field(default="exact_match", description="exact_match | choice (option log-likelihood) | "
                           "perplexity | rouge_l | sari | edit_similarity | number (the answer's number) | "
                           "choice_letter (the option letter in a generated answer)")
    input_field: str = "input"
    output_field: str = "output"
    options_field: str = "options"
    format: Literal["plain", "chat"] = "plain"
    template: str = "{input}"
    answer_prefix: str | None = None
    choice_norm: bool = Field(default=False, description="choice tasks: score by acc_norm (log-likelihood per "
                              "character of the option, as lm-evaluation-harness) instead of acc")
    max_train: int | None = Field(default=None, ge=1)
    max_test: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "TaskSpec":
        files = self.train is not None or self.test is not None
        if files and self.dataset:
            raise ValueError("give either train/test files or a dataset, not both")
        if not self.dataset and (self.train is None or self.test is None):
            raise ValueError("needs both 'train' and 'test' files (or a 'dataset')")
        if "{input}" not in self.template:
            raise ValueError("template must contain '{input}'")
        return self


class StreamSpec(_Strict):
    """A built-in stream by name; the field's benchmarks take an order, caps and a full copy."""

    name: str = Field(description="a built-in stream (retain list shows them, with orders and sizes)")
    order: int | None = Field(default=None, description="the benchmark's published task order "
                              "(standard-cl 1-3, long-cl 4-6, superni-cl 1-2); default: its first")
    max_train: int | None = Field(default=None, ge=1, description="cap on train items per task (a seeded sample)")
    max_test: int | None = Field(default=None, ge=1, description="cap on test items per task (a seeded sample, "
                                 "stratified by label)")
    data_dir: str | None = Field(default=None, description="a full copy in the benchmark's own layout (O-LoRA's "
                                 "CL_Benchmark/, a TRACE LLM-CL-Benchmark_<size>/ folder) instead of the shipped one")

    @model_validator(mode="after")
    def _known(self) -> "StreamSpec":
        from retain.streams import BUILTIN_STREAMS, NAMED_STREAMS

        if self.name in NAMED_STREAMS:
            orders = NAMED_STREAMS[self.name].orders
            if self.order is not None and self.order not in orders:
                raise ValueError(f"stream '{self.name}' has no order {self.order}; orders: "
                                 + ", ".join(str(o) for o in orders))
        elif self.name in BUILTIN_STREAMS:
            given = [k for k in ("order", "max_train", "max_test", "data_dir") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"stream '{self.name}' is a synthetic stream: '{given[0]}' applies to the named "
                                 f"benchmarks only ({', '.join(NAMED_STREAMS)})")
        else:
            valid = sorted({*BUILTIN_STREAMS, *NAMED_STREAMS})
            raise ValueError(f"unknown stream '{self.name}'; built-in streams: {', '.join(valid)}")
        return self


class TrainConfig(_Strict):
    max_steps: int = Field(default=100, ge=1, description="optimizer steps per task")
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    max_length: int = Field(default=256, ge=8, description="tokens per training example")
    precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu"] = "auto"
    checkpoint_every: int = Field(default=50, ge=0, description="steps between checkpoints inside a task "
                                  "(weights, optimizer, RNG and data position; a kill loses at most this many "
                                  "steps); 0: at task ends only")
    gradient_checkpointing: bool = Field(default=False, description="recompute each layer's activations in the "
                                         "backward pass instead of keeping them: less memory per step for longer "
                                         "sequences or larger batches, at more compute per step")
    group_by_length: bool = Field(default=False, description="batches of examples of similar token length "
                                  "(each epoch still visits every example once): less padding, more tokens/s "
                                  "when lengths vary")
    sharding: Literal["none", "zero2", "zero3"] = Field(default="none", description="in a run launched as N "
                                                        "processes, shard the weights (zero3), or gradients and "
                                                        "optimizer state (zero2), over them with FSDP2: less memory "
                                                        "per process; none: every process holds the whole model")


class HarnessConfig(_Strict):
    """lm-evaluation-harness on the live model after every phase (``retain[harness]``)."""

    tasks: list[str] = Field(min_length=1, description="lm-eval task names: retain_<task> / retain_probe (this "
                             "run's choice tasks as lm-eval tasks), or tasks under include_path")
    include_path: str | None = Field(default=None, description="a folder of your own lm-eval task YAMLs (local data)")
    limit: int | None = Field(default=None, ge=1, description="items per task (lm-eval's --limit)")


class EvalConfig(_Strict):
    batch_size: int = Field(default=32, ge=1)
    max_test: int | None = Field(default=None, ge=1, description="cap on test examples per task: a seeded "
                                 "sample, stratified by label, the same items in every row and run")
    sample_seed: int = Field(default=0, description="seed of the max_test / probe_max samples (not the run's "
                             "seed, so runs with different seeds score the same items)")
    probe_choice_norm: bool = Field(default=False, description="score the probe by acc_norm instead of acc")
    harness: HarnessConfig | None = Field(default=None, description="also score with lm-evaluation-harness")
    max_new_tokens: int = Field(default=16, ge=1)
    max_length: int | None = Field(default=None, ge=2, description="longest sequence scoring feeds the model "
                                   "(prompt and answer); longer prompts are cut from the left, as "
                                   "lm-evaluation-harness cuts them. Default: the model's positions")
    probe: bool | str | list[str] = Field(default=True, description="general-ability probes scored after every "
                                         "task: true (the default suite), false, or names among mmlu, arc-easy, "
                                         "arc-challenge, hellaswag, piqa, csqa, boolq, gsm8k, facts")
    probe_max: int | None = Field(default=None, ge=1, description="cap on items per probe (a seeded sample)")
    probe_file: str | None = Field(default=None, description="your own probe (scored as 'custom'): JSONL/CSV of "
                                   "input, output, options")
    membership: int = Field(default=0, ge=0, description="membership-inference check: this many training "
                            "examples (members) and held-out test examples per task, loss-threshold AUC at the base "
                            "model and after the last task (0.5: nothing leaks); 0: off")
    probe_template: str = Field(default="Question: {input}\nAnswer:", description="prompt of the facts and "
                                "custom probes (the named suites have their benchmark's prompt)")

    @model_validator(mode="after")
    def _template(self) -> "EvalConfig":
        if "{input}" not in self.probe_template:
            raise ValueError("probe_template must contain '{input}'")
        self.probe_names()
        return self

    def probe_names(self) -> list[str]:
        """The probes this run scores, in order (``custom``: ``probe_file``)."""
        from retain.streams.benchmarks import DEFAULT_PROBES, PROBE_NAMES

        if self.probe is True:
            # probe_file alone replaces the default suite, as it always has.
            names = [] if self.probe_file else list(DEFAULT_PROBES)
        elif self.probe is False:
            names = []
        else:
            names = [self.probe] if isinstance(self.probe, str) else list(self.probe)
        unknown = [n for n in names if n not in PROBE_NAMES]
        if unknown:
            raise ValueError(f"eval.probe: unknown probe '{unknown[0]}'; valid: true, false, "
                             + ", ".join(PROBE_NAMES))
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval.probe: '{dup[0]}' is named twice")
        return names + (["custom"] if self.probe_file and self.probe is not False else [])


class OnlineConfig(_Strict):
    """Task-free online learning: the stream as one pass of mini-batches with hidden boundaries."""

    boundaries: Literal["sharp", "blurry"] = Field(default="sharp", description="sharp: the tasks in order, the "
                                                   "boundary hidden; blurry: neighbouring tasks mix near it")
    blur: float = Field(default=0.1, ge=0, le=1, description="blurry: standard deviation of each example's "
                        "position, in task lengths (about 2x this fraction of a task mixes across a boundary)")
    passes: int = Field(default=1, ge=1, le=100, description="gradient steps on each incoming batch")
    eval_every: int | None = Field(default=None, ge=1, description="examples between anytime evaluations of "
                                   "every task (default: 4 per task's length), and at each hidden boundary")
    probe_every: int | None = Field(default=None, ge=1, description="examples between probe evaluations "
                                    "(default: at the hidden boundaries only)")
    prequential: bool = Field(default=True, description="score each incoming batch before training on it "
                              "(online accuracy)")
    task_labels: bool = Field(default=False, description="let strategies see each example's task (task-aware "
                              "online learning); off: every item says task 'stream'")


class PrivacyConfig(_Strict):
    """DP-SGD through Opacus (``retain[privacy]``): per-example clipping, Gaussian noise, Poisson batches."""

    epsilon: float | None = Field(default=None, gt=0, description="privacy budget each phase spends on its own "
                                  "examples (the noise multiplier is derived from it); replayed examples spend more, "
                                  "reported per task and in total")
    noise_multiplier: float | None = Field(default=None, gt=0, description="fixed noise (std / max_grad_norm) "
                                           "instead of a target epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; below 1/N of every "
                         "task")
    max_grad_norm: float = Field(default=1.0, gt=0, description="each example's gradient is clipped to this norm "
                                 "(replaces train.max_grad_norm)")
    accountant: Literal["prv", "rdp"] = Field(default="prv", description="Opacus's accountant: prv (tight, "
                                              "Opacus's default) or rdp")

    @model_validator(mode="after")
    def _one(self) -> "PrivacyConfig":
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of epsilon (a target budget) or noise_multiplier")
        return self


class FederatedDP(_Strict):
    """Client-level DP on the averaged updates (Flower's server-side fixed clipping)."""

    noise_multiplier: float = Field(gt=0, description="noise std over clipping_norm, added to the average")
    clipping_norm: float = Field(gt=0, description="each client's update (its adapter minus the global one) is "
                                 "clipped to this L2 norm")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="delta for the reported epsilon")


class FederatedConfig(_Strict):
    """Federated continual learning on Flower (``retain[federated]``): clients average LoRA adapters."""

    clients: int = Field(default=2, ge=2, le=64, description="simulated clients, each with a disjoint shard of "
                         "every task's training examples")
    rounds: int = Field(default=2, ge=1, description="federated rounds per task")
    local_steps: int = Field(default=10, ge=1, description="optimizer steps each client takes per round")
    aggregation: Literal["fedavg", "fedprox"] = Field(default="fedavg", description="FedAvg (weighted by the "
                                                      "clients' examples) or FedProx (clients add a proximal term)")
    proximal_mu: float = Field(default=0.01, ge=0, description="FedProx's mu: (mu/2)||w - w_global||^2")
    engine: Literal["simulation", "deployment"] = Field(default="simulation", description="simulation: virtual "
                                                         "clients on Ray in this process; deployment: a running "
                                                         "SuperLink and its SuperNodes")
    superlink: str = Field(default="127.0.0.1:8000", description="deployment: the SuperLink's address (host:port)")
    insecure: bool = Field(default=False, description="deployment: talk to the SuperLink without TLS (local tests "
                           "only)")
    root_certificates: str | None = Field(default=None, description="deployment: CA certificate of the SuperLink's "
                                          "TLS")
    dp: FederatedDP | None = Field(default=None, description="client-level DP: clip each client's update, add "
                                   "Gaussian noise to the average (needs retain[privacy] for the accounting)")

    @model_validator(mode="after")
    def _tls(self) -> "FederatedConfig":
        if self.engine == "deployment" and not self.insecure and not self.root_certificates:
            raise ValueError("engine deployment: give root_certificates (the SuperLink's CA) or insecure: true")
        return self


class AnalysisConfig(_Strict):
    """Update analysis (dW = W - W0): off unless enabled, since it keeps a copy of W0."""

    enabled: bool = False
    every: int = Field(default=0, ge=0, description="steps between measurements in a phase; 0: phase ends only")
    kl_prompts: int = Field(default=32, ge=0, description="held-out prompts for KL(fine-tuned || base)")
    probe: bool = Field(default=False, description="score the probe at in-phase measurements too")
    tasks: bool = Field(default=False, description="score the stream's tasks at in-phase measurements too")
    ranks: bool = Field(default=True, description="90%-energy rank of every matrix (one SVD each)")
    energy: float = Field(default=0.9, gt=0, le=1)
    taus: list[float] = Field(default_factory=lambda: [1e-6, 1e-5], min_length=1)


class RunConfig(BaseModel):
    """A whole run. Unknown top-level keys must be a registered strategy's options section."""

    model_config = ConfigDict(extra="allow")

    name: RunName
    model: str = "smollm2-135m-instruct"
    model_quantization: Literal["nf4", "int8"] | None = Field(
        default=None, description="load the base through bitsandbytes (QLoRA: nf4, double quantization, bf16 "
        "compute; or int8) and train LoRA adapters on it; CUDA only")
    trust_remote_code: bool = False
    stream: StreamSpec | None = None
    tasks: list[TaskSpec] | None = None
    strategy: str = "naive"
    seed: int = 0
    seeds: list[int] | None = Field(default=None, min_length=1, description="one run per seed under the run "
                                    "directory (seed-<s>/) and an aggregate over them; replaces 'seed'")
    output_dir: str = "runs"
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    online: OnlineConfig | None = Field(default=None, description="task-free online learning: one pass over "
                                        "the stream with hidden boundaries and anytime evaluation")
    privacy: PrivacyConfig | None = Field(default=None, description="differentially private training (DP-SGD, "
                                          "Opacus): pip install 'retain[privacy]'")
    federated: FederatedConfig | None = Field(default=None, description="federated continual learning on "
                                              "Flower's simulation engine: pip install 'retain[federated]'")
    trackers: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list, description="experiment trackers fed through Accelerate (each an optional extra: "
        "pip install 'retain[trackers]'); files go to <run>/trackers/")

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def stream_name(self) -> str:
        """The stream's name in results and reports ("custom": a ``tasks`` list)."""
        return self.stream.name if self.stream is not None else "custom"

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if (self.stream is None) == (self.tasks is None):
            raise ValueError("give exactly one of 'stream' (a built-in name) or 'tasks' (a list)")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"'seeds' repeats a seed: {self.seeds}")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("'tasks' is empty")
            names = [t.name for t in self.tasks]
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"task names must be unique, repeated: {sorted(dup)}")
            clash = sorted(set(names) & set(self.eval.probe_names()))
            if clash:
                raise ValueError(f"task '{clash[0]}' has the name of a probe this run scores; rename the task")
        if self.train.group_by_length and self.online is not None:
            raise ValueError("train.group_by_length: online mode trains the stream in its arrival order, "
                             "which grouping by length would change; drop one of the two")
        if self.train.group_by_length and self.privacy is not None:
            raise ValueError("train.group_by_length: DP-SGD draws each batch by Poisson sampling (its privacy "
                             "accounting assumes it), so batches cannot be grouped by length; drop one of the two")
        from retain.strategies import option_models, parse_strategy

        parse_strategy(self.strategy)  # raises ValueError naming valid strategies
        sections = option_models()
        for key, value in list((self.model_extra or {}).items()):
            if key not in sections:
                valid = sorted(set(RunConfig.model_fields) | set(sections))
                raise ValueError(f"unknown key '{key}'; valid top-level keys: {', '.join(valid)}")
            try:
                self.model_extra[key] = sections[key].model_validate(value or {})
            except ValidationError as exc:
                raise ValueError(format_errors(exc, prefix=key, model=sections[key])) from None
        return self

    def unused_sections(self) -> list[str]:
        """Options sections of methods this run does not use (one file may serve several
        arms of a study); validated, and named to the user, but not an error."""
        from retain.strategies import parse_strategy

        used = {c.options_key for c in parse_strategy(self.strategy)}
        return sorted(k for k in (self.model_extra or {}) if k not in used)

    def options(self, key: str) -> BaseModel:
        """The validated options section ``key`` (defaults if the config has none)."""
        from retain.strategies import option_models

        extra = self.model_extra or {}
        return extra[key] if key in extra else option_models()[key]()

    def resolved(self) -> dict[str, Any]:
        """Every key with its effective value, strategy sections included."""
        from retain.strategies import parse_strategy

        data = self.model_dump(mode="json", exclude_none=True)
        for strategy in parse_strategy(self.strategy):
            if strategy.options_key:
                data[strategy.options_key] = self.options(strategy.options_key).model_dump(mode="json", by_alias=True)
        return data


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def allowed_range(model: type[BaseModel], loc: tuple) -> str | None:
    """The numeric bounds declared on the field at ``loc`` (e.g. "> 0 and <= 1")."""
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = field.annotation
    return field_bounds(field) if field else None


def field_bounds(field) -> str | None:
    """A pydantic field's numeric bounds as text ("> 0 and <= 1")."""
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata
              for attr, sym in _BOUNDS if getattr(m, attr, None) is not None]
    return " and ".join(bounds) or None


def format_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif model is not None and err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            bounds = allowed_range(model, tuple(err["loc"]))
            if bounds:
                msg += f" (allowed: {bounds})"
        lines.append(f"'{loc}': {msg}" if loc else msg)
    return "; ".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part == "stream" and node is data and isinstance(node.get(part), str):
            node[part] = {"name": node[part]}  # `stream: numbers` plus `stream.max_train=16`
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars (``5``, ``true``, ``[q_proj]``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RetainError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=20)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RetainError(f"override '{item}': cannot parse the value as YAML ({_yaml_problem(exc)})") from None
        _set_dotted(data, key.strip(), value)
    return data


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message on one line."""
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RetainError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RetainError(f"{path}{_yaml_where(exc)}: invalid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise RetainError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
    return data


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise RetainError(f"{source}: {format_errors(exc, model=RunConfig)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply overrides, validate. Relative task paths resolve against the config's folder."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    config = validate_config(data, source=str(path))
    base = path.resolve().parent
    for task in config.tasks or []:
        for field in ("train", "test"):
            value = getattr(task, field)
            if value and not Path(value).is_absolute() and (base / value).exists():
                setattr(task, field, str(base / value))
        if task.dataset and (base / task.dataset).exists():
            task.dataset = str(base / task.dataset)
    probe = config.eval.probe_file
    if probe and not Path(probe).is_absolute() and (base / probe).exists():
        config.eval.probe_file = str(base / probe)
    return config
