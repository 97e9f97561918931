import pytest

from retain.config import apply_overrides, load_config, validate_config
from retain.errors import RetainError

BASE = {"name": "x", "model": "tiny-random", "stream": "numbers"}


def test_defaults_and_strategy_sections():
    cfg = validate_config({**BASE, "strategy": "lora+replay", "replay": {"buffer_size": 10}})
    assert cfg.train.max_steps == 100
    assert cfg.options("replay").buffer_size == 10
    assert cfg.options("lora").r == 16  # default section when absent
    resolved = cfg.resolved()
    assert resolved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert resolved["replay"]["ratio"] == 0.25


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({**BASE, "trian": {}}, "unknown key 'trian'"),
        ({**BASE, "train": {"max_step": 3}}, "'train.max_step': unknown key"),
        ({**BASE, "train": {"max_steps": "many"}}, "'train.max_steps'"),
        ({**BASE, "train": {"lr": -1}}, "'train.lr'"),
        ({**BASE, "strategy": "ewc2"}, "unknown strategy 'ewc2'; valid:"),
        ({**BASE, "strategy": "lora+naive"}, "both decide which weights train"),
        ({**BASE, "strategy": "lora-per-task+joint"}, "joint trains every task in one phase"),
        ({**BASE, "replay": {"ratio": 1.5}}, "'replay.ratio'"),
        ({**BASE, "lora": {"rank": 4}}, "'lora.rank': unknown key"),
        ({"name": "x", "model": "tiny-random"}, "exactly one of 'stream'"),
        ({**BASE, "name": "a b"}, "'name'"),
    ],
)
def test_bad_config_names_the_key(data, fragment):
    with pytest.raises(RetainError) as info:
        validate_config(data, source="c.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("c.yaml")


def test_overrides_parse_yaml_scalars():
    data = apply_overrides(BASE, ["train.max_steps=7", "lora.target_modules=[q_proj]", "eval.probe=false"])
    cfg = validate_config({**data, "strategy": "lora"})
    assert cfg.train.max_steps == 7 and cfg.options("lora").target_modules == ["q_proj"] and cfg.eval.probe is False
    with pytest.raises(RetainError, match="key=value"):
        apply_overrides(BASE, ["train.max_steps"])



def test_a_stream_given_by_name_takes_dotted_overrides():
    data = apply_overrides({"name": "x", "stream": "standard-cl"}, ["stream.max_train=16", "stream.order=2"])
    assert data["stream"] == {"name": "standard-cl", "max_train": 16, "order": 2}


def test_task_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "d").mkdir()
    for f in ("tr.jsonl", "te.jsonl"):
        (tmp_path / "d" / f).write_text('{"input": "a", "output": "b"}\n')
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: x\nmodel: tiny-random\ntasks:\n  - {name: t, train: d/tr.jsonl, test: d/te.jsonl}\n")
    cfg = load_config(cfg_file)
    assert cfg.tasks[0].train == str(tmp_path / "d" / "tr.jsonl")


def test_missing_config_file():
    with pytest.raises(RetainError, match="config file not found"):
        load_config("nope.yaml")
