import pytest
import torch

from retain.errors import RetainError
from retain.models import load_model, resolve_model_spec
from retain.streams.task import Example, Task


def test_tiny_random_is_deterministic_and_has_a_real_tokenizer():
    m1, tok = load_model("tiny-random")
    m2, _ = load_model("tiny-random")
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    text = "Is 481 even? Ünïcode ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"


def test_local_directory_loads_with_from_pretrained(tmp_path):
    model, tok = load_model("tiny-random")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model(str(tmp_path / "m"))
    assert resolve_model_spec(str(tmp_path / "m"))[0] == "dir"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_spec("someorg/some-model") == ("hub", "someorg/some-model")
    with pytest.raises(RetainError, match="someorg/some-model' could not be loaded"):
        load_model("someorg/some-model")


@pytest.mark.parametrize(
    "spec, fragment",
    [("missing.gguf", "GGUF file not found"), ("./nowhere", "unknown model './nowhere'; valid:"),
     ("bad name!", "unknown model 'bad name!'")],
)
def test_bad_model_specs(spec, fragment):
    with pytest.raises(RetainError, match=fragment):
        resolve_model_spec(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(RetainError, match="has no config.json"):
        resolve_model_spec(str(tmp_path))


def test_plain_and_chat_prompt_formats():
    _, tok = load_model("tiny-random")
    ex = Example("What is 2+2?", "4")
    plain = Task("p", [ex], [ex], template="Q: {input}\nA:")
    assert plain.prompt(tok, ex) == "Q: What is 2+2?\nA:" and plain.target("4") == " 4"
    chat = Task("c", [ex], [ex], format="chat")
    assert chat.prompt(tok, ex) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert chat.target("4") == "4"
