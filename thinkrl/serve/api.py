"""The HTTP face of ``thinkrl serve``: OpenAI's chat and completions endpoints (FastAPI).

Requests are validated by pydantic models; a field out of range, an unknown option or
malformed JSON answers HTTP 400 with OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}``. Replies follow OpenAI's schema, plus DeepSeek's ``reasoning_content``
on chat messages and stream deltas. docs/serve.md lists the fields.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinkrl.rollout import SamplingParams
from thinkrl.rollout.thinking import CLOSE, OPEN, thinking_open
from thinkrl.serve.scheduler import Event, QueueFull, Sequence
from thinkrl.serve.split import ThinkSplitter

# reasoning_effort -> thinking budget (tokens of thinking before the closing phrase is forced)
EFFORT_BUDGETS = {"low": 256, "medium": 1024, "high": 4096}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request schemas -------------------------------------------------------------------------


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's extension: end-of-sequence is banned before this many tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    thinking_budget: int | None = Field(None, ge=0)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    user: str | None = None
    # accepted and ignored, as the sampling here has no such penalties
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def budget(self) -> int | None:
        if self.thinking_budget is not None and self.reasoning_effort is not None:
            raise APIError(400, "give thinking_budget or reasoning_effort, not both", "thinking_budget")
        if self.reasoning_effort is not None:
            return EFFORT_BUDGETS[self.reasoning_effort]
        return self.thinking_budget


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
            if len(parts) != len(self.content):
                raise APIError(400, "only text content parts are supported", "messages")
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    chat_template_kwargs: dict | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(not p for p in v))):
            raise ValueError("prompt must be a non-empty string or a list of them")
        return v


# -- the app ---------------------------------------------------------------------------------


class Backend:
    """What the endpoints need: the scheduler, the tokenizer, names and limits."""

    def __init__(self, scheduler, tok, name: str, max_len: int, default_max_tokens: int = 512):
        self.sched, self.tok, self.name, self.max_len = scheduler, tok, name, max_len
        self.default_max_tokens = default_max_tokens

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def render(self, req: ChatRequest) -> str:
        return render_chat(
            self.tok, [{"role": m.role, "content": m.text()} for m in req.messages], req.chat_template_kwargs
        )

    def sequences(
        self, req: _Common, prompt: str, max_tokens: int | None, top: int
    ) -> tuple[list[int], list[Sequence]]:
        ids = self.encode(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty after tokenization", "prompt")
        room = self.max_len - len(ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server's context is {self.max_len}",
                "messages" if isinstance(req, ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        want = max_tokens or self.default_max_tokens
        params = SamplingParams(
            max_new_tokens=min(want, room),
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_new_tokens=req.min_tokens,
            thinking_budget=req.budget(),
        )
        seqs = [
            Sequence(
                ids=ids,
                params=params,
                index=i,
                seed=None if req.seed is None else req.seed + i,
                stop=tuple(req.stop or ()),
                prompt_text=prompt,
                top_logprobs=top,
            )
            for i in range(req.n)
        ]
        return ids, seqs


def render_chat(tok, messages: list[dict], template_kwargs: dict | None = None) -> str:
    """The prompt text of a conversation: the chat template with ``template_kwargs``. An
    explicit ``enable_thinking`` that the template does not act on is applied by a prefill:
    an open ``<think>`` (DeepSeek-R1's template ends so) for True, an empty closed block
    (Qwen3's no-think form) for False."""
    msgs = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in messages
    ]
    kwargs = dict(template_kwargs or {})
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001 (a template error is the request's fault)
        raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
    think = kwargs.get("enable_thinking")
    if think is True and not thinking_open(text):
        text += OPEN + "\n"
    elif think is False and thinking_open(text):
        text += "\n" + CLOSE + "\n\n"
    elif think is False and not text.rstrip().endswith(CLOSE):
        text += f"{OPEN}\n\n{CLOSE}\n\n"
    return text


def _check_model(backend: Backend, req: _Common) -> None:
    if req.model and req.model != backend.name:
        raise APIError(
            404,
            f"the model '{req.model}' does not exist; this server serves '{backend.name}'",
            "model",
            "model_not_found",
        )


def _submit(backend: Backend, seqs: list[Sequence]) -> asyncio.Queue:
    """Queue ``seqs`` with the scheduler (HTTP 429 if it is full); their events arrive on the
    returned asyncio queue. Called before a streamed reply starts, so a refusal is a status."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[Event] = asyncio.Queue()
    for s in seqs:
        s.emit = lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev)
    try:
        backend.sched.submit(seqs)
    except QueueFull as e:
        raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error") from None
    return q


async def _events(q: asyncio.Queue, seqs: list[Sequence], request: Request, poll: float = 0.25):
    """The events of ``seqs`` as they come, until each has finished. Whatever ends the
    iteration early (the client disconnected, checked every ``poll`` seconds, or the
    response was cancelled) cancels the sequences: their slots are freed at the next decode
    step."""
    left, checked = len(seqs), time.monotonic()
    try:
        while left:
            if time.monotonic() - checked >= poll:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            try:
                ev = await asyncio.wait_for(q.get(), poll)
            except TimeoutError:
                continue
            left -= ev.finish is not None
            yield ev
    finally:
        for s in seqs:
            s.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(backend: Backend) -> FastAPI:
    app = FastAPI(title="thinkrl serve")
    app.state.backend = backend

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        text = f"{where}: {msg}" if where else msg
        if err.get("type") == "extra_forbidden":
            text = f"unknown field '{where}'"
        elif err.get("type") in ("json_invalid", "model_attributes_type"):
            text = "the request body is not a JSON object"
        return JSONResponse(
            error_body(text, "invalid_request_error", where, "invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.get("/health")
    async def health():
        s = backend.sched
        return {
            "status": "ok",
            "model": backend.name,
            "active": s.active,
            "waiting": len(s.waiting),
            "slots": s.dec.max_slots,
            "steps": s.steps,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": backend.name, "object": "model", "created": 0, "owned_by": "thinkrl"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(backend, req)
        prompt = backend.render(req)
        top = (req.top_logprobs or 0) if req.logprobs else 0
        ids, seqs = backend.sequences(req, prompt, req.max_completion_tokens or req.max_tokens, top)
        opened = thinking_open(prompt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        events = _events(_submit(backend, seqs), seqs, request)
        if req.stream:
            gen = _stream_chat(backend, events, seqs, rid, created, len(ids), opened, req)
            return StreamingResponse(gen, media_type="text/event-stream")
        return await _collect_chat(backend, events, seqs, rid, created, len(ids), opened, req.logprobs)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(backend, req)
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        all_seqs, n_prompt = [], 0
        for i, p in enumerate(prompts):
            ids, seqs = backend.sequences(req, p, req.max_tokens or 16, req.logprobs or 0)
            for s in seqs:
                s.index += i * req.n
            all_seqs += seqs
            n_prompt += len(ids)
        events = _events(_submit(backend, all_seqs), all_seqs, request)
        if req.stream:
            return StreamingResponse(
                _stream_completion(backend, events, rid, created, n_prompt, req),
                media_type="text/event-stream",
            )
        return await _collect_completion(backend, events, all_seqs, rid, created, n_prompt, req.logprobs)

    return app


# -- replies ---------------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprobs(backend: Backend, toks, top: bool) -> dict:
    dec = backend.tok.decode
    return {
        "content": [
            {
                "token": dec([e.token]),
                "logprob": e.logp,
                "bytes": list(dec([e.token]).encode()),
                "top_logprobs": [
                    {"token": dec([t]), "logprob": v, "bytes": list(dec([t]).encode())}
                    for t, v in (e.top or [])
                ]
                if top
                else [],
            }
            for e in toks
        ]
    }


async def _gather(events, seqs) -> tuple[dict, dict, dict]:
    """A non-streamed request's text, tokens and finish reason per choice, from its events."""
    texts = {s.index: "" for s in seqs}
    toks = {s.index: [] for s in seqs}
    finish = {}
    async for ev in events:
        texts[ev.index] += ev.text
        toks[ev.index] += ev.tokens
        if ev.finish:
            finish[ev.index] = ev.finish
    if any(f == "error" for f in finish.values()):
        raise APIError(500, "generation failed on the server (see its log)", kind="server_error")
    return texts, toks, finish


async def _collect_chat(backend, events, seqs, rid, created, n_prompt, opened, logprobs):
    texts, toks, finish = await _gather(events, seqs)
    choices = []
    for i in sorted(texts):
        reasoning, content = ThinkSplitter(opened).feed(texts[i], final=True)
        msg = {
            "role": "assistant",
            "content": content.rstrip(),
            "reasoning_content": reasoning.rstrip() or None,
        }
        choices.append(
            {
                "index": i,
                "message": msg,
                "finish_reason": finish.get(i, "stop"),
                "logprobs": _chat_logprobs(backend, toks[i], True) if logprobs else None,
            }
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": backend.name,
        "choices": choices,
        "usage": _usage(n_prompt, sum(len(t) for t in toks.values())),
    }


async def _stream_chat(backend, events, seqs, rid, created, n_prompt, opened, req):
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": backend.name}
    split = {s.index: ThinkSplitter(opened) for s in seqs}
    n_tokens = 0
    try:
        async for ev in events:
            if ev.finish == "error":
                yield _sse(error_body("generation failed on the server (see its log)", "server_error"))
                return
            n_tokens += len(ev.tokens)
            reasoning, content = split[ev.index].feed(ev.text, final=ev.finish is not None)
            for part, key in ((reasoning, "reasoning_content"), (content, "content")):
                if part:
                    delta = {"role": "assistant", key: part}
                    yield _sse(
                        {
                            **head,
                            "choices": [
                                {"index": ev.index, "delta": delta, "finish_reason": None, "logprobs": None}
                            ],
                        }
                    )
            if ev.finish:
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {"index": ev.index, "delta": {}, "finish_reason": ev.finish, "logprobs": None}
                        ],
                    }
                )
    finally:
        await events.aclose()  # a client that went away cancels its sequences now
    if (req.stream_options or {}).get("include_usage"):
        yield _sse({**head, "choices": [], "usage": _usage(n_prompt, n_tokens)})
    yield "data: [DONE]\n\n"


def _completion_logprobs(backend: Backend, toks, top: bool, offset: int = 0) -> dict:
    dec = backend.tok.decode
    strs = [dec([e.token]) for e in toks]
    offsets, at = [], offset
    for s in strs:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": strs,
        "token_logprobs": [e.logp for e in toks],
        "top_logprobs": [{dec([t]): v for t, v in (e.top or [])} for e in toks] if top else None,
        "text_offset": offsets,
    }


async def _collect_completion(backend, events, seqs, rid, created, n_prompt, logprobs):
    texts, toks, finish = await _gather(events, seqs)
    choices = [
        {
            "index": i,
            "text": texts[i],
            "finish_reason": finish.get(i, "stop"),
            "logprobs": _completion_logprobs(backend, toks[i], bool(logprobs))
            if logprobs is not None
            else None,
        }
        for i in sorted(texts)
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": backend.name,
        "choices": choices,
        "usage": _usage(n_prompt, sum(len(t) for t in toks.values())),
    }


async def _stream_completion(backend, events, rid, created, n_prompt, req):
    head = {"id": rid, "object": "text_completion", "created": created, "model": backend.name}
    n_tokens = 0
    try:
        async for ev in events:
            n_tokens += len(ev.tokens)
            lp = (
                _completion_logprobs(backend, ev.tokens, bool(req.logprobs))
                if req.logprobs is not None
                else None
            )
            if ev.text or ev.finish or lp:
                yield _sse(
                    {
                        **head,
                        "choices": [
                            {"index": ev.index, "text": ev.text, "finish_reason": ev.finish, "logprobs": lp}
                        ],
                    }
                )
    finally:
        await events.aclose()  # a client that went away cancels its sequences now
    if (req.stream_options or {}).get("include_usage"):
        yield _sse({**head, "choices": [], "usage": _usage(n_prompt, n_tokens)})
    yield "data: [DONE]\n\n"
