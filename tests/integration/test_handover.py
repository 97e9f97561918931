"""Hand-over on tiny-random: `retain serve` answers real HTTP requests, `retain export` writes
folders that PEFT and transformers load on their own and that reproduce the run's logits."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import task_rows, write_jsonl

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


def make_run(root: Path, name: str, strategy: str, **extra) -> Path:
    """A finished two-task run on tiny-random (tasks with inputs the router can tell apart)."""
    from retain.config import load_config
    from retain.loop import execute

    data = root / "data"
    data.mkdir(exist_ok=True)
    files = {n: write_jsonl(data / f"{n}.jsonl", rows) for n, rows in {
        "a_train": task_rows("upper", 16), "a_test": task_rows("upper", 6),
        "b_train": task_rows("choice", 10), "b_test": task_rows("choice", 6)}.items()}
    cfg = {"name": name, "model": "tiny-random", "strategy": strategy, "output_dir": str(root / "runs"),
           "tasks": [{"name": "upper", "train": str(files["a_train"]), "test": str(files["a_test"]),
                      "metric": "exact_match"},
                     {"name": "small", "train": str(files["b_train"]), "test": str(files["b_test"]),
                      "metric": "choice"}],
           "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2}, "eval": {"probe": False, "max_new_tokens": 4},
           **extra}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    execute(load_config(path), quiet=True)
    return root / "runs" / name


@pytest.fixture(scope="module")
def per_task_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("handover"), "lpt", "lora-per-task+merge")


def distinct_adapters(handed) -> None:
    """Three training steps barely move LoRA's B from zero: give each adapter a clearly different update."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in handed.ctx.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(per_task_run):
    """`retain serve`'s app on a real uvicorn server on localhost, in a thread."""
    import uvicorn

    from retain.handover import load
    from retain.serve import create_app

    handed = load(per_task_run)
    distinct_adapters(handed)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(handed, max_batch=4), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield handed, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def alone(handed, adapter: str, prompt: str, tokens: int = 6) -> str:
    """The greedy answer of one adapter to one prompt, outside the server."""
    from retain.evaluation import generate

    with handed.offer(adapter).use():
        return generate(handed.ctx.model, handed.ctx.tokenizer, [prompt], max_new_tokens=tokens)[0]


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"temperature": 0, "max_tokens": 6, **body}, timeout=60)


def test_models_lists_every_offer(server):
    handed, url = server
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert ids == ["final", "upper", "small", "merged-linear", "merged-ties", "base", "auto"]


def test_completion_is_the_adapters_own_answer(server):
    handed, url = server
    r = complete(url, model="upper", prompt="upper sun")
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["text"] == alone(handed, "upper", "upper sun")
    assert body["model"] == "upper" and r.headers["x-retain-adapter"] == "upper"
    assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
    assert alone(handed, "upper", "upper sun") != alone(handed, "small", "upper sun")  # adapters differ
    base = complete(url, model="base", prompt="upper sun").json()["choices"][0]["text"]
    assert base == alone(handed, "base", "upper sun")


def test_auto_routes_each_input_to_its_task(server):
    handed, url = server
    for prompt, task in [("upper hat", "upper"), ("is 7 small?", "small")]:
        body = complete(url, model="auto", prompt=prompt).json()
        assert body["model"] == task
        assert body["choices"][0]["text"] == alone(handed, task, prompt)


def test_concurrent_requests_for_two_adapters_are_not_mixed(server):
    handed, url = server
    asks = [("upper", "upper cat"), ("small", "upper cat"), ("upper", "is 2 small?"), ("small", "is 2 small?")] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: complete(url, model=a[0], prompt=a[1]).json(), asks))
    for (adapter, prompt), body in zip(asks, got):
        assert body["model"] == adapter
        assert body["choices"][0]["text"] == alone(handed, adapter, prompt)


def test_streaming_sends_the_same_text_in_pieces(server):
    handed, url = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "small", "prompt": "is 3 small?", "max_tokens": 6, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone(handed, "small", "is 3 small?")


def test_chat_uses_the_chat_template_and_streams(server):
    handed, url = server
    messages = [{"role": "user", "content": "upper map"}]
    tok = handed.ctx.tokenizer
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": "auto", "messages": messages, "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert body["model"] == "upper" and body["object"] == "chat.completion"
    from retain.serve import encode

    with handed.offer("upper").use(), torch.no_grad():
        ids = torch.tensor([encode(tok, prompt)])
        out = handed.ctx.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                        do_sample=False, pad_token_id=tok.pad_token_id)
    assert body["choices"][0]["message"]["content"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "upper", "messages": messages, "max_tokens": 5, "temperature": 0,
                            "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
        body["choices"][0]["message"]["content"]


def test_stop_string_ends_the_answer_without_it(server):
    handed, url = server
    full = alone(handed, "upper", "upper box", 8)
    assert len(full) >= 2
    stop = full[1]
    body = complete(url, model="upper", prompt="upper box", max_tokens=8, stop=[stop]).json()
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("payload,status,needle", [
    ('{"model": "nope", "prompt": "x"}', 404, "not served here"),
    ('{"model": "upper", "prompt": ', 400, "not valid JSON"),
    ('{"model": "upper"}', 400, "prompt"),
    ('{"model": "upper", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "upper", "prompt": "x", "n": 2}', 400, "n > 1"),
    ('[1, 2]', 400, "JSON object"),
    ('{"model": "upper", "prompt": "x", "max_tokens": 100000}', 200, ""),  # capped at the server's max_tokens
])
def test_bad_requests_get_a_clear_4xx(server, payload, status, needle):
    _, url = server
    r = httpx.post(f"{url}/v1/completions", content=payload, headers={"content-type": "application/json"},
                   timeout=120)
    assert r.status_code == status, r.text
    if status != 200:
        assert needle in r.json()["error"]["message"]


def test_api_key_is_required_when_set(per_task_run):
    from fastapi.testclient import TestClient

    from retain.handover import load
    from retain.serve import create_app

    with TestClient(create_app(load(per_task_run), api_key="s3cret")) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# -- export -------------------------------------------------------------------------------

def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_reproduces_the_runs_logits_with_plain_peft_and_transformers(per_task_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from retain.export import export
    from retain.handover import load

    out = tmp_path / "export"
    manifest = export(per_task_run, out)
    handed = load(per_task_run)
    ids = torch.tensor([handed.ctx.tokenizer("upper cat and is 3 small?")["input_ids"]])
    for adapter in ("upper", "small", "merged-ties"):
        with handed.offer(adapter).use():
            want = logits(handed.ctx.model, ids)
        with handed.offer("base").use():
            assert not torch.allclose(want, logits(handed.ctx.model, ids), atol=1e-7)  # the adapter matters
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        tuned = PeftModel.from_pretrained(base, out / "adapters" / adapter).eval()
        assert torch.allclose(logits(tuned, ids), want, atol=1e-5)
    # model/: the adapter the run ends with (the last task's), merged into the base weights.
    assert manifest["model"]["merged_adapter"] == "small"
    with handed.offer("final").use():
        want = logits(handed.ctx.model, ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert torch.allclose(logits(merged, ids), want, atol=1e-5)
    vllm = json.loads((out / "vllm.json").read_text())
    assert vllm["command"][:3] == ["vllm", "serve", "base"] and "--enable-lora" in vllm["command"]
    assert {f"{n}=adapters/{n}" for n in ("upper", "small")} <= set(vllm["command"])
    router = json.loads((out / "router.json").read_text())
    assert router["tasks"] == ["upper", "small"] and len(router["centroids"][0]) == handed.ctx.model.config.hidden_size
    ties = yaml.safe_load((out / "mergekit" / "ties.yaml").read_text())
    assert ties["merge_method"] == "ties" and [m["model"] for m in ties["models"]] == \
        ["base+adapters/upper", "base+adapters/small"]
    card = (out / "README.md").read_text()
    assert "| after small |" in card and "library_name: peft" in card


def test_export_of_a_fully_fine_tuned_run_is_its_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    from retain.export import export
    from retain.handover import load

    run = make_run(tmp_path, "naive", "naive")
    manifest = export(run, tmp_path / "out")
    assert "adapters" not in manifest and manifest["model"]["merged_adapter"] is None
    handed = load(run)
    ids = torch.tensor([[1, 5, 9, 13]])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    assert torch.allclose(logits(exported, ids), logits(handed.ctx.model, ids), atol=1e-6)
    assert "base" not in handed.names  # a fully fine-tuned model has no base left to switch to


def test_export_refusals_leave_nothing_behind(per_task_run, tmp_path):
    from retain.errors import RetainError
    from retain.export import export

    with pytest.raises(RetainError, match="--merge nope: no such adapter; adapters of this run: merged-linear"):
        export(per_task_run, tmp_path / "a", merge="nope")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    with pytest.raises(RetainError, match="already exists"):
        export(per_task_run, tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["keep.txt"]
    l2p = make_run(tmp_path, "l2p", "l2p")
    with pytest.raises(RetainError, match="l2p: its soft prompts"):
        export(l2p, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.*"))


def test_cli_export_prints_what_it_wrote_and_serve_refuses_an_unfinished_run(per_task_run, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "retain.cli", "export", per_task_run, tmp_path / "x", "--no-model"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "vllm      cd " in out.stdout and "router    router.json" in out.stdout
    assert not (tmp_path / "x" / "model").exists() and (tmp_path / "x" / "adapters" / "upper").is_dir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("name: half\n")
    bad = subprocess.run([sys.executable, "-m", "retain.cli", "serve", tmp_path / "half"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
    assert "is not a finished run (no results.json); finish it with `retain run --resume" in bad.stderr
