"""Every ready config in configs/ validates and starts with the command that runs it."""

from pathlib import Path

import pytest

from retain.config import load_config, read_yaml, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_validates_and_names_its_command(path):
    rel = path.relative_to(ROOT)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    if "accelerate" in path.parts:  # an `accelerate launch` config, read by Accelerate itself
        from accelerate.commands.config.config_args import load_config_from_file

        assert f"accelerate launch --config_file {rel} -m retain.cli run" in path.read_text(encoding="utf-8")
        config = load_config_from_file(str(path))
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        return
    if first == f"# retain study {rel}":
        from retain.study import load_study

        study, arms = load_study(path)
        assert study.name == path.stem and len(arms) == len(study.arms)
        return
    assert first.startswith("# ") and f"retain run {rel}" in first
    if "gpu" in path.parts:
        # Its model and data are files a user puts in place; the keys must still be valid.
        data = read_yaml(path)
        data["model"] = "tiny-random"
        if data.get("tasks"):  # a named benchmark stream runs from the shipped copies
            data["tasks"], data["stream"], data["eval"]["probe_file"] = None, "arithmetic", None
        validate_config(data, source=str(path))
    else:
        assert load_config(path).name == path.stem


def test_a_probe_file_replaces_the_builtin_probe(tmp_path):
    from retain.streams.builtin import probe_task

    f = tmp_path / "probe.jsonl"
    f.write_text('{"input": "The sky is", "output": "blue", "options": ["blue", "green"]}\n'
                 '{"input": "Grass is", "output": 1, "options": ["blue", "green"]}\n', encoding="utf-8")
    probe = probe_task(path=str(f), template="{input}")
    assert [ex.output for ex in probe.test] == ["blue", "green"] and probe.template == "{input}"
    f.write_text('{"input": "The sky is", "output": "blue"}\n', encoding="utf-8")
    from retain.errors import RetainError

    with pytest.raises(RetainError, match=r"probe.jsonl:1: .*needs an options list"):
        probe_task(path=str(f))
