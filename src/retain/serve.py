"""``retain serve RUN``: an OpenAI-compatible HTTP server over a finished run's models.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(``stream: true`` sends server-sent events). ``model`` names one of the run's offers (see
:mod:`retain.handover`): a task adapter, a merged adapter, ``final``, ``base`` or ``auto``.
With ``auto`` the run's task router picks the adapter from the input; every response names
the adapter that answered (``model`` and the ``x-retain-adapter`` header).

One worker thread owns the model, because switching adapters changes the model for every
caller: requests wait in a queue, and those that ask for the same adapter with the same
generation settings are answered by one batched ``generate`` call. Adapters are never mixed
within a forward pass (PEFT activates adapters per model, not per row). A streamed request
runs alone so its tokens can be sent as they come.

Written on FastAPI and uvicorn; the OpenAI wire format is written out here because no
maintained library serves transformers+PEFT models with per-request adapters on a CPU.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from retain.handover import AUTO, HandedOver

#: Generation settings that must agree for requests to share one batched call.
GenKey = tuple


class Problem(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Unknown fields (user, logit_bias, ...) are accepted and ignored, as OpenAI clients send them.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The text of the message (OpenAI clients may send a list of typed parts)."""
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text") for p in self.content]
        if any(p.get("type") != "text" or not isinstance(t, str) for p, t in zip(self.content, parts)):
            raise Problem(400, "only text message parts are supported", param="messages")
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass
class Job:
    """One prompt to answer; ``adapter`` is filled in by the worker when the request says ``auto``."""

    model: str
    prompt: str
    route_text: str
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    stream: bool = False
    adapter: str | None = None
    future: Future = field(default_factory=Future)
    #: Streamed text pieces (None ends the stream), filled by the worker for ``stream`` jobs.
    chunks: "queue.Queue[str | BaseException | None]" = field(default_factory=queue.Queue)

    def key(self) -> GenKey:
        return (self.adapter, self.max_tokens, self.temperature, self.top_p, tuple(self.stops), self.seed)


@dataclass
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; a chat template's text already holds the BOS token, so none is added."""
    bos = tokenizer.bos_token
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded, as OpenAI returns it) and whether one was hit."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of streamed ``text`` could still begin a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


class Engine:
    """The worker that owns the model: takes queued jobs, groups them by adapter and settings."""

    def __init__(self, handed: HandedOver, max_batch: int = 8) -> None:
        self.handed, self.max_batch = handed, max_batch
        self.model, self.tokenizer = handed.ctx.model, handed.ctx.tokenizer
        self.jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.device = next(self.model.parameters()).device
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.thread = threading.Thread(target=self._loop, name="retain-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    # -- the worker ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            pending = [first]
            while True:  # everything already waiting joins this round
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                pending.append(job)
            try:
                self._resolve(pending)
            except Exception as exc:  # the router failed: every job of the round gets the error
                for job in pending:
                    self._fail(job, exc)
                continue
            for group in self._groups(pending):
                try:
                    self._run(group)
                except Exception as exc:
                    for job in group:
                        self._fail(job, exc)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.stream:
            job.chunks.put(exc)
        elif not job.future.done():
            job.future.set_exception(exc)

    def _resolve(self, jobs: list[Job]) -> None:
        auto = [j for j in jobs if j.model == AUTO]
        for job, task in zip(auto, self.handed.route([j.route_text for j in auto]) if auto else []):
            job.adapter = task
        for job in jobs:
            job.adapter = job.adapter or job.model

    def _groups(self, jobs: list[Job]) -> Iterator[list[Job]]:
        """Same adapter and settings, at most ``max_batch`` a group, in arrival order; streams alone."""
        groups: dict[GenKey, list[Job]] = {}
        order: list[list[Job]] = []
        for job in jobs:
            if job.stream:
                order.append([job])
                continue
            group = groups.get(job.key())
            if group is None or len(group) >= self.max_batch:
                group = groups[job.key()] = []
                order.append(group)
            group.append(job)
        return iter(order)

    def encode(self, prompt: str) -> list[int]:
        return encode(self.tokenizer, prompt)

    def _run(self, group: list[Job]) -> None:
        job, tok = group[0], self.tokenizer
        encoded = [self.encode(j.prompt) for j in group]
        pad, eos = tok.pad_token_id, tok.eos_token_id
        width = max(len(e) for e in encoded)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # left padding: every row's answer starts at ``width``
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        settings: dict[str, Any] = {"max_new_tokens": job.max_tokens, "pad_token_id": pad, "eos_token_id": eos}
        if job.stops:
            settings.update(stop_strings=job.stops, tokenizer=tok)
        if job.temperature > 0:
            settings.update(do_sample=True, temperature=job.temperature, top_p=job.top_p)
            if job.seed is not None:
                torch.manual_seed(job.seed)
        else:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if job.stream:
            from transformers import TextIteratorStreamer

            streamer = settings["streamer"] = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            relay = threading.Thread(target=self._relay, args=(job, streamer), daemon=True)
            relay.start()
        try:
            with self.handed.offer(job.adapter).use(), torch.no_grad():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **settings)
        except BaseException:
            if job.stream:
                streamer.end()
            raise
        if job.stream:
            relay.join()
            job.chunks.put(None)
        for row, j in enumerate(group):
            new = out[row, width:].tolist()
            ended = eos is not None and eos in new
            count = new.index(eos) + 1 if ended else len(new)
            text, stopped = cut_at_stop(tok.decode(new[:count], skip_special_tokens=True), j.stops)
            reason = "stop" if ended or stopped else "length"
            j.future.set_result(Answer(text, reason, len(encoded[row]), count, j.adapter))

    def _relay(self, job: Job, streamer) -> None:
        """Pass the streamer's text on, holding back what could be the start of a stop string."""
        text, sent, stopped = "", 0, False
        for piece in streamer:
            text += piece
            cut, stopped = cut_at_stop(text, job.stops)
            end = len(cut) if stopped else len(text) - held_back(text, job.stops)
            if end > sent:
                job.chunks.put(text[sent:end])
                sent = end
            if stopped:
                break
        if stopped:  # the rest up to the streamer's end signal is not sent
            for _ in streamer:
                pass
        if sent < len(cut_at_stop(text, job.stops)[0]):
            job.chunks.put(cut_at_stop(text, job.stops)[0][sent:])


def create_app(handed: HandedOver, *, api_key: str | None = None, max_batch: int = 8, max_tokens: int = 256):
    """The FastAPI application; the worker starts with it and stops at shutdown."""
    engine: dict[str, Engine] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine["e"] = Engine(handed, max_batch=max_batch)
        yield
        engine.pop("e").close()

    app = FastAPI(title="retain serve", lifespan=lifespan,
                  description=f"OpenAI-compatible endpoints over run {handed.run_dir}")
    created = int(time.time())

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(invalid(exc.errors()).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception):
        problem = Problem(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(problem.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(Problem(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                problem = Problem(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                                  "authentication_error", "invalid_api_key")
                return JSONResponse(problem.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        data = [{"id": name, "object": "model", "created": created, "owned_by": "retain",
                 "description": handed.offers[name].description if name in handed.offers else
                 "routed: the task adapter whose training inputs are nearest to the prompt"}
                for name in handed.names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": str(handed.run_dir)}

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Problem(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise Problem(400, "the request body must be a JSON object")
        try:
            req = schema.model_validate(payload)
        except ValidationError as exc:
            raise invalid(exc.errors()) from None
        if req.model not in handed.names:
            raise Problem(404, f"model '{req.model}' is not served here; available: {', '.join(handed.names)}",
                          code="model_not_found", param="model")
        if req.n != 1:
            raise Problem(400, "n > 1 is not supported: send the request n times (with different seeds)",
                          param="n")
        return req

    def jobs_for(req: _Request, prompts: list[str], route_texts: list[str], limit: int | None) -> list[Job]:
        wanted = min(limit or max_tokens, max_tokens)
        out = []
        for prompt, route_text in zip(prompts, route_texts):
            length = len(engine["e"].encode(prompt))
            context = engine["e"].context
            if context is not None and length + wanted > context:
                raise Problem(400, f"the prompt has {length} tokens; with max_tokens {wanted} that exceeds the "
                              f"model's context of {context}", param="max_tokens")
            out.append(Job(req.model, prompt, route_text, wanted, req.temperature, req.top_p, req.stops(),
                           req.seed, stream=req.stream))
        return out

    async def answer(job: Job) -> Answer:
        return await asyncio.wrap_future(engine["e"].submit(job).future)

    def usage(answers: list[Answer]) -> dict[str, int]:
        p, c = sum(a.prompt_tokens for a in answers), sum(a.completion_tokens for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def streamed(job: Job, ident: str, kind: str):
        e = engine["e"]
        e.submit(job)

        first = [True]

        def event(delta: str | None, finish: str | None) -> str:
            if kind == "chat":
                message = {"content": delta} if delta is not None else {}
                if first[0] and delta is not None:
                    message, first[0] = {"role": "assistant", **message}, False
                body = {"index": 0, "delta": message, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                body = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            chunk = {"id": ident, "object": obj, "created": int(time.time()), "model": job.adapter or job.model,
                     "choices": [body]}
            return f"data: {json.dumps(chunk)}\n\n"

        async def gen():
            while True:
                piece = await asyncio.to_thread(job.chunks.get)
                if piece is None:
                    break
                if isinstance(piece, BaseException):
                    err = {"error": {"message": f"generation failed: {piece}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                yield event(piece, None)
            done = await asyncio.wrap_future(job.future)
            yield event(None, done.finish_reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise Problem(400, "prompt is an empty list", param="prompt")
        if req.stream and len(prompts) > 1:
            raise Problem(400, "stream with several prompts is not supported; send one prompt per request",
                          param="prompt")
        jobs = jobs_for(req, prompts, prompts, req.max_tokens or 16)
        ident = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            return streamed(jobs[0], ident, "completion")
        answers = await asyncio.gather(*(answer(j) for j in jobs))
        choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
                   for i, a in enumerate(answers)]
        body = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": answers[0].adapter,
                "choices": choices, "usage": usage(answers), "retain": {"adapters": [a.adapter for a in answers],
                                                                        "requested": req.model}}
        return JSONResponse(body, headers={"x-retain-adapter": answers[0].adapter})

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        tok = handed.ctx.tokenizer
        if not getattr(tok, "chat_template", None):
            raise Problem(400, "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        users = [m["content"] for m in messages if m["role"] == "user"]
        jobs = jobs_for(req, [prompt], [users[-1] if users else messages[-1]["content"]],
                        req.max_completion_tokens or req.max_tokens)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return streamed(jobs[0], ident, "chat")
        a = await answer(jobs[0])
        body = {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": a.adapter,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": a.finish_reason}],
                "usage": usage([a]), "retain": {"adapters": [a.adapter], "requested": req.model}}
        return JSONResponse(body, headers={"x-retain-adapter": a.adapter})

    return app


def invalid(errors: list[dict[str, Any]]) -> Problem:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return Problem(400, f"invalid request: {where}: {first.get('msg', 'malformed')}", param=where)


def serve(run_dir, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_tokens: int = 256, log_level: str = "info") -> None:
    """Load the run and serve it until interrupted."""
    import uvicorn

    from retain.handover import load

    handed = load(run_dir)
    app = create_app(handed, api_key=api_key, max_batch=max_batch, max_tokens=max_tokens)
    print(f"serving {run_dir} on http://{host}:{port}/v1 - models: {', '.join(handed.names)}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
