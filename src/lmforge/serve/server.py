"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    lmforge serve                                   # the bundled SmolLM2 on 127.0.0.1:8000
    lmforge serve ckpt/ --embedding-model minilm/ --api-key $KEY --port 8080

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` as
server-sent events ending in ``data: [DONE]``), POST /v1/embeddings (an encoder such as MiniLM),
GET /health, GET /metrics (Prometheus text). A client that goes away, mid-stream or while waiting,
cancels its request at once, which frees its KV blocks before the engine's next step.

Request bodies are pydantic models (serve/protocol.py) that FastAPI validates before an endpoint runs,
so ``/openapi.json`` and ``/docs`` describe the API as it is. Errors have OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``: a bad request is 400 with one sentence that starts
with the field's path (``'messages[0].content' must be ...``) and the top-level field as ``param``;
a prompt longer than ``max_prompt_tokens`` (``--max-prompt-tokens``, default: the context) is 400
naming both lengths; a full queue 429; a missing or wrong API key 401 (serve/guard.py: also 413 for a
body over ``--max-body-bytes``, 415 for one that is not JSON). Tokenizing, chat templates, tools and
grammar compilation run in a worker thread, never on the event loop: ``GET /health`` answers at once
while a long prompt is tokenized.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from lmforge.errors import UserError
from lmforge.engine import Engine, EngineConfig, QueueFullError, SamplingError, SamplingParams, SequenceOutput, TokenLogprob
from lmforge.engine.prompt import chat_ids, token_budget
from lmforge.engine.constraints import ConstraintError, Grammar, compile_grammar
from lmforge.rag.embed import Embedder  # the one embedder: RAG indexing and /v1/embeddings
from lmforge.serve.errors import APIError, bad, error_body, install_error_handlers
from lmforge.serve.guard import DEFAULT_MAX_BODY_BYTES, RequestGuard
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ErrorResponse, Message
from lmforge.tools import ToolError, ToolSet, parse_tool_calls, parse_tools

log = logging.getLogger("lmforge.serve")


_WHY = {400: "a bad request; the message names the field, which 'param' holds", 401: "a missing or wrong API key",
        404: "no such model here", 413: "a body over the server's --max-body-bytes",
        415: "a body that is not 'Content-Type: application/json'", 429: "the queue is full: retry later"}  # fmt: skip


def _responses(*statuses: int) -> dict:
    """OpenAPI's description of the errors a route may answer, in OpenAI's error body (any other
    status, such as 500, too: so FastAPI's 422, which this server never sends, is not listed)."""
    out: dict[int | str, dict] = {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}
    return out | {"default": {"model": ErrorResponse, "description": "a server error (500: the details are in its log)"}}


# --- requests: from the validated body (serve/protocol.py) to engine inputs --------------------------
def _sampling(body: CompletionRequest | ChatCompletionRequest, logprobs: int, vocab_size: int) -> dict:
    """SamplingParams fields common to chat and completions (OpenAI's, then vLLM-style extras)."""
    for i, t in enumerate(body.stop_token_ids or ()):
        if t >= vocab_size:
            raise bad(f"'stop_token_ids[{i}]' is {t}, outside the vocabulary (0..{vocab_size - 1}).", "stop_token_ids")
    return dict(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, seed=body.seed, n=body.n,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, logprobs=logprobs,
    )  # fmt: skip


def _asked_constraint(body: CompletionRequest | ChatCompletionRequest) -> tuple[str, dict] | None:
    """The grammar a request asks its reply to match, as (field, compile_grammar's arguments): OpenAI's
    ``response_format`` (json_object, json_schema), or the vLLM-style extras guided_json / guided_regex /
    guided_grammar (Lark). The protocol lets a request ask for one at most."""
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        return "response_format", {"json_object": True}
    if rf is not None and rf.type == "json_schema":
        return "response_format", {"json_schema": rf.json_schema.schema_}
    for name, arg in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            return name, {arg: getattr(body, name)}
    return None


def _constraint(asked: tuple[str, dict] | None, default: Grammar | None) -> Grammar | None:
    """The compiled constraint a request asked for, else the server's --grammar."""
    if asked is None:
        return default
    param, spec = asked
    try:
        return compile_grammar(**spec, param=param)
    except ConstraintError as e:
        raise bad(str(e), param) from None


class Spec:
    """A parsed generation request."""

    def __init__(self, prompts: list[list[int]], fields: dict, max_tokens: int | None, stream: bool,
                 include_usage: bool, want_logprobs: bool, echo: bool = False):  # fmt: skip
        self.prompts, self.fields, self.max_tokens = prompts, fields, max_tokens
        self.stream, self.include_usage, self.want_logprobs = stream, include_usage, want_logprobs
        self.echo = echo  # completions: the prompt comes back before the completion (its logprobs too)
        self.tools: ToolSet | None = None  # chat with tools: replies are parsed into tool_calls

    def params(self, engine: Engine, prompt: list[int], default_max: int | None) -> SamplingParams:
        if self.max_tokens == 0:  # echo only: one token is generated, and dropped (see _generate)
            engine.check_prompt(prompt)
            return SamplingParams(max_new_tokens=1, **self.fields)
        engine.check_prompt(prompt, self.max_tokens)
        max_new = self.max_tokens if self.max_tokens is not None else default_max
        room = token_budget(len(prompt), engine.max_model_len, engine.model.config, engine.max_model_len)
        return SamplingParams(max_new_tokens=room if max_new is None else min(max_new, room), **self.fields)


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and bool(body.stream_options.include_usage)


def completion_spec(state: Server, body: CompletionRequest) -> Spec:
    """What /v1/completions does before the engine: tokenize the prompts, compile the constraint
    (blocking work: the endpoint runs it in a thread)."""
    p = body.prompt
    items = [p] if isinstance(p, str) or isinstance(p[0], int) else p  # one prompt, or an array of them
    prompts = []
    for k, item in enumerate(items):
        ids = state.engine.tokenizer.encode(item) if isinstance(item, str) else item
        state.check_prompt_tokens(ids, "the prompt" if len(items) == 1 else f"prompt[{k}]", "prompt")
        prompts.append(ids)
    fields = _sampling(body, body.logprobs or 0, state.engine.model.config.vocab_size)
    fields["constraint"] = _constraint(_asked_constraint(body), state.grammar)
    return Spec(prompts, fields, body.max_tokens, body.stream, _include_usage(body), body.logprobs is not None, body.echo)


def chat_spec(state: Server, body: ChatCompletionRequest) -> Spec:
    """What /v1/chat/completions does before the engine: check the tools, render the chat template,
    tokenize, compile the constraint (blocking work: the endpoint runs it in a thread)."""
    tokenizer = state.engine.tokenizer
    tools_in = None if body.tools is None else [t.model_dump(exclude_none=True) for t in body.tools]
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    try:
        tools = parse_tools(tools_in, choice, body.parallel_tool_calls)
        template_tools = tools.openai_tools() if tools.active and "tools" in (tokenizer.chat_template or "") else None
        messages = tools.render([_message(m) for m in body.messages], tokenizer)
    except ToolError as e:
        raise bad(str(e), e.param) from None
    try:
        prompt = chat_ids(tokenizer, messages, tools=template_tools)
    except UserError as e:
        raise bad(str(e), "messages") from None
    state.check_prompt_tokens(prompt, "the messages' prompt", "messages")
    fields = _sampling(body, body.top_logprobs or 0, state.engine.model.config.vocab_size)
    asked = _asked_constraint(body)
    if tools.active:  # the reply is text or tool calls, by the tools' own grammar
        if asked is not None:
            raise bad(f"'{asked[0]}' cannot be combined with tools: give one or the other.", asked[0])
        try:
            fields["constraint"] = tools.grammar()
        except ToolError as e:
            raise bad(str(e), e.param) from None
    else:
        fields["constraint"] = _constraint(asked, state.grammar)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    spec = Spec([prompt], fields, max_tokens, body.stream, _include_usage(body), body.logprobs)
    spec.tools = tools if tools.active else None
    return spec


def _message(m: Message) -> dict:
    """A message as chat templates take it: the content one string, earlier tool calls as dicts."""
    content = "".join(part.text for part in m.content) if isinstance(m.content, list) else m.content or ""
    out = {"role": m.role, "content": content}
    out |= {k: getattr(m, k) for k in ("name", "tool_call_id") if getattr(m, k) is not None}
    if m.role == "assistant" and m.tool_calls:
        out["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
    return out


def embedding_inputs(embedder: Embedder, value: str | list) -> list[list[int]]:
    """Token ids of each input (blocking work: the endpoint runs it in a thread)."""
    items = [value] if isinstance(value, str) or isinstance(value[0], int) else value
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = embedder.tokenizer.encode(item)
        elif max(item) >= (vocab := embedder.model.config.vocab_size):
            raise bad(f"'input[{i}]' holds token id {max(item)}, outside the vocabulary (0..{vocab - 1}).", "input")
        else:
            ids = item
        if len(ids) > embedder.max_len:
            raise bad(f"'input[{i}]' has {len(ids)} tokens but {embedder.name}'s context is {embedder.max_len} tokens: "
                      "shorten it.", "input")  # fmt: skip
        out.append(ids)
    return out


# --- the app -------------------------------------------------------------------------------------
class Server:
    """State shared by the endpoints: the engine, the embedder, counters."""

    def __init__(self, engine: Engine | None, model_name: str | None, embedder: Embedder | None, api_key: str | None,
                 max_prompt_tokens: int | None = None):  # fmt: skip
        if engine is None and embedder is None:
            raise UserError("a server needs a generator model, an embedding model, or both.")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise UserError(f"max_prompt_tokens (--max-prompt-tokens) must be at least 1, got {max_prompt_tokens}.")
        self.engine, self.model_name, self.embedder, self.api_key = engine, model_name, embedder, api_key
        self.max_prompt_tokens = max_prompt_tokens or (engine.max_model_len if engine is not None else None)
        self.grammar: Grammar | None = None  # --grammar: the constraint of requests that bring none
        self.requests: Counter[tuple[str, int]] = Counter()
        self.started = int(time.time())
        self._token_text: dict[int, str] = {}

    # tokens as text, for logprobs
    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def check_model(self, name: str, kind: str) -> str:
        served = self.model_name if kind == "generate" else (self.embedder.name if self.embedder else None)
        if kind == "generate" and self.engine is None:
            raise APIError(404, "this server hosts no text-generation model, only embeddings.", "model", "model_not_found")
        if kind == "embed" and self.embedder is None:
            raise APIError(404, "this server hosts no embedding model: start it with --embedding-model.", "model", "model_not_found")
        if name != served:
            raise APIError(404, f"the model '{name}' does not exist here; this server serves '{served}'.", "model", "model_not_found")
        return name

    def check_prompt_tokens(self, ids: list[int], what: str, param: str) -> None:
        if len(ids) > self.max_prompt_tokens:
            raise bad(f"{what} has {len(ids)} tokens but this server takes at most {self.max_prompt_tokens} tokens per "
                      "prompt (--max-prompt-tokens): shorten it.", param)  # fmt: skip


class EventStream(StreamingResponse):
    """Server-sent events that stop, and cancel their request, the moment the client disconnects
    (even while no token is being sent), whatever ASGI version the server speaks."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away between two events
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


class Pending:
    """The engine requests of one HTTP request (one per prompt), merged into one queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SequenceOutput]] = asyncio.Queue()
        self.rids: list[str] = []
        self.left = 0

    def add(self, k: int, prompt: list[int], params: SamplingParams, want_logprobs: bool,
            prompt_logprobs: int | None = None) -> None:  # fmt: skip
        put = self.queue.put_nowait
        rid = self.engine.add_request(
            prompt, params, lambda o: self.loop.call_soon_threadsafe(put, (k, o)), want_logprobs=want_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        self.rids.append(rid)
        self.left += params.n

    async def next(self) -> tuple[int, SequenceOutput]:
        k, out = await self.queue.get()
        if out.finish_reason is not None:
            self.left -= 1
        return k, out

    def abort(self) -> None:
        if self.left:
            for rid in self.rids:
                self.engine.abort(rid)
            self.left = 0


def create_app(
    engine: Engine | None,
    model_name: str | None = None,
    *,
    embedder: Embedder | None = None,
    api_key: str | None = None,
    manage_engine: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
    grammar: Grammar | None = None,
    rag=None,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI app. ``manage_engine``: start the engine's thread at start-up, stop it at shutdown.
    ``grammar``: the constraint of every completion whose request brings none (``--grammar``).
    ``rag``: a RAG database (path or open ``Retriever``) served at ``POST /v1/rag/query``.
    ``max_prompt_tokens``: the most tokens one prompt may have (default: the engine's max_model_len)."""
    state = Server(engine, model_name, embedder, api_key, max_prompt_tokens)
    state.grammar = grammar

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None and manage_engine:
            engine.start()
        try:
            yield
        finally:
            if engine is not None and manage_engine:
                engine.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.server = state

    # --- errors, counted requests, auth ----------------------------------------------------------
    install_error_handlers(app)  # APIError, request validation, HTTP errors: OpenAI's error body (serve/errors.py)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(error_body("internal server error; the details are in the server log.", "server_error"), 500)

    # the API key, JSON-only bodies and the body limit hold for every route: serve/guard.py (inside the
    # request counter, so refused requests are counted too)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)

    counted = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics"}

    class CountRequests:  # plain ASGI middleware: leaves streaming and disconnects alone
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            status = [500]

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                path = scope["path"] if scope["path"] in counted else "other"
                state.requests[(path, status[0])] += 1

    app.add_middleware(CountRequests)
    if allowed_origins:  # CORS is off unless asked for: other origins' pages can't call this server
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])  # fmt: skip

    v1 = APIRouter(responses=_responses(401))

    # --- endpoints -------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine is not None and manage_engine and not engine.running_in_thread:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return {"status": "ok", "rag": rag is not None}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        """The browser chat page (static; its API calls carry the key the user types into it)."""
        return HTMLResponse(chat_page_html())

    @v1.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @v1.get("/v1/models")
    async def models():
        data = []
        if engine is not None:
            data.append({"id": model_name, "object": "model", "created": state.started, "owned_by": "lmforge",
                         "max_model_len": engine.max_model_len})  # fmt: skip
        if embedder is not None:
            data.append({"id": embedder.name, "object": "model", "created": state.started, "owned_by": "lmforge",
                         "max_model_len": embedder.max_len})  # fmt: skip
        return {"object": "list", "data": data}

    @v1.get("/v1/models/{model_id:path}", responses=_responses(404))
    async def model_card(model_id: str):
        for card in (await models())["data"]:
            if card["id"] == model_id:
                return card
        raise APIError(404, f"the model '{model_id}' does not exist here; GET /v1/models lists what is served.",
                       "model", "model_not_found")  # fmt: skip

    generation = {**_responses(400, 404, 413, 415, 429), 200: {
        "description": "the completion; with stream: true, server-sent events ending in 'data: [DONE]'",
        "content": {"text/event-stream": {"schema": {"type": "string"}}}}}  # fmt: skip

    @v1.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request):
        name = state.check_model(body.model, "generate")
        spec = await run_in_threadpool(completion_spec, state, body)
        return await _generate(request, state, spec, name, chat=False, default_max=16)

    @v1.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        name = state.check_model(body.model, "generate")
        spec = await run_in_threadpool(chat_spec, state, body)
        return await _generate(request, state, spec, name, chat=True, default_max=None)

    @v1.post("/v1/embeddings", responses=_responses(400, 404, 413, 415))
    async def embeddings(body: EmbeddingRequest):
        name = state.check_model(body.model, "embed")
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise bad(f"'dimensions' must be {embedder.dim} for {name} (it cannot shorten its embeddings).", "dimensions")

        def embed() -> tuple[list[list[int]], torch.Tensor]:
            inputs = embedding_inputs(embedder, body.input)
            return inputs, embedder.embed(inputs)

        inputs, vectors = await run_in_threadpool(embed)
        data = []
        for i, v in enumerate(vectors):
            b64 = body.encoding_format == "base64"
            emb: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() if b64 else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n_tok = sum(len(x) for x in inputs)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}}

    if rag is not None:  # retrieval only: the chat page and clients generate through the engine with the context
        from lmforge.serve.rag_route import rag_router

        app.include_router(rag_router(rag))
    app.include_router(v1)
    return app


# --- generation ----------------------------------------------------------------------------------
async def _generate(request: Request, state: Server, spec: Spec, name: str, *, chat: bool, default_max: int | None):
    engine = state.engine
    pending = Pending(engine)
    try:
        params = [spec.params(engine, p, default_max) for p in spec.prompts]
        prompt_lps = spec.fields["logprobs"] if spec.echo and spec.want_logprobs else None
        for k, (prompt, p) in enumerate(zip(spec.prompts, params)):
            pending.add(k, prompt, p, spec.want_logprobs, prompt_lps)
    except QueueFullError as e:
        pending.abort()
        raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
    except SamplingError as e:  # the error names its parameter; a prompt's is "messages" in a chat
        pending.abort()
        param = {"prompt": "messages" if chat else "prompt", "max_new_tokens": "max_tokens"}.get(e.param, e.param)
        raise bad(str(e).replace("max_new_tokens", "max_tokens"), param) from None
    n = params[0].n
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in spec.prompts)
    if spec.stream:
        events = _stream_events(state, pending, spec, rid, created, name, n, prompt_tokens, chat)
        return EventStream(events, pending.abort)

    # not streamed: collect, and stop at once if the client goes away while we wait
    choices: dict[int, dict] = {}

    async def collect() -> None:
        while pending.left:
            k, out = await pending.next()
            c = choices.setdefault(k * n + out.index, {"text": "", "ids": [], "lps": [], "reason": None, "error": None,
                                                       "prompt": k, "prompt_lps": None})  # fmt: skip
            c["text"] += out.text
            c["ids"] += out.token_ids
            if out.logprobs:
                c["lps"] += out.logprobs
            if out.prompt_logprobs is not None:
                c["prompt_lps"] = out.prompt_logprobs
            if out.finish_reason is not None:
                c["reason"], c["error"] = out.finish_reason, (out.error, out.error_status or 500)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collector, watcher = asyncio.create_task(collect()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
            pending.abort()
    if not collector.done() or collector.cancelled():
        return JSONResponse(error_body("client disconnected"), status_code=499)
    collector.result()
    errors = sorted((c["error"] for c in choices.values() if c["reason"] == "error"), key=lambda e: -e[1])
    if errors:  # the request's own fault (e.g. its grammar gave out while decoding) is a 400, the server's a 500
        message, status = errors[0]
        raise APIError(status, f"generation failed: {message}", None, None, _error_type(status))
    if spec.max_tokens == 0:  # echo only: drop the one token generated
        for c in choices.values():
            c.update(text="", ids=[], lps=[], reason="length")
    completion_tokens = sum(len(c["ids"]) for c in choices.values())
    out_choices = []
    for i in sorted(choices):
        c = choices[i]
        lps = c["lps"]
        if spec.echo:
            prompt = spec.prompts[c["prompt"]]
            c["text"] = engine.tokenizer.decode(prompt, skip_special_tokens=False) + c["text"]
            lps = (c["prompt_lps"] or [TokenLogprob(t, None, []) for t in prompt]) + lps
            lps[0] = lps[0] or TokenLogprob(prompt[0], None, [])
        lp = _logprobs(state, lps, chat, spec.fields["logprobs"]) if spec.want_logprobs else None
        if chat:
            message, reason = {"role": "assistant", "content": c["text"]}, c["reason"]
            if spec.tools is not None:
                content, calls = parse_tool_calls(c["text"])
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    reason = "tool_calls" if reason == "stop" else reason
            out_choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        else:
            out_choices.append({"index": i, "text": c["text"], "logprobs": lp, "finish_reason": c["reason"]})
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": name,
            "choices": out_choices, "usage": usage}  # fmt: skip


def _error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def _logprobs(state: Server, lps, chat: bool, top: int, text_offset: int = 0) -> dict:
    """OpenAI's logprobs objects: chat's ``content`` list, or completions' parallel arrays."""
    if chat:
        def entry(tid: int, lp: float) -> dict:
            t = state.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(i, v) for i, v in x.top]} for x in lps]}
    tokens = [state.token_text(x.token_id) for x in lps]
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],  # None for an echoed prompt's first token
        "top_logprobs": [{state.token_text(i): v for i, v in x.top} if x.logprob is not None else None for x in lps]
        if top else None,
        "text_offset": offsets,
    }


async def _stream_events(state: Server, pending: Pending, spec: Spec, rid: str, created: int, name: str, n: int,
                         prompt_tokens: int, chat: bool) -> AsyncIterator[str]:  # fmt: skip
    obj = "chat.completion.chunk" if chat else "text_completion"
    completion_tokens = 0
    offsets: Counter[int] = Counter()
    held: dict[int, str] = {}  # chat with tools: text held back while it may be a tool call

    def event(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                      "choices": choices, **extra}, separators=(",", ":")) + "\n\n"  # fmt: skip

    try:
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                         for i in range(len(spec.prompts) * n)])  # fmt: skip
        while pending.left:
            k, out = await pending.next()
            index = k * n + out.index
            completion_tokens += len(out.token_ids)
            if out.finish_reason == "error":
                yield "data: " + json.dumps(error_body(f"generation failed: {out.error}", _error_type(out.error_status or 500))) + "\n\n"
                continue
            if out.finish_reason == "abort":
                continue
            lp = None
            if spec.want_logprobs and out.logprobs:
                lp = _logprobs(state, out.logprobs, chat, spec.fields["logprobs"], offsets[index])
            if not out.text and lp is None and out.finish_reason is None:
                continue
            offsets[index] += len(out.text)
            if chat and spec.tools is not None:  # a reply that may be tool calls is held until it is whole
                if index not in held and (spec.tools.choice != "auto" or out.text.startswith("<") or not out.text):
                    held[index] = ""
                if index in held:
                    held[index] += out.text
                    if out.finish_reason is None:
                        continue
                    content, calls = parse_tool_calls(held.pop(index))
                    reason = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
                    delta = {"tool_calls": [{**c, "index": j} for j, c in enumerate(calls)]} if calls else {}
                    if content:
                        delta["content"] = content
                    yield event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}])
                    continue
            if chat:
                delta = {"content": out.text} if out.text or out.finish_reason is None else {}
                yield event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}])
            else:
                yield event([{"index": index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}])
        if spec.include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        pending.abort()


# --- metrics -------------------------------------------------------------------------------------
def render_metrics(state: Server) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    reqs = sorted(state.requests.items())
    metric("lmforge_http_requests_total", "counter", "HTTP requests by path and status code.",
           [(f'{{path="{p}",status="{s}"}}', c) for (p, s), c in reqs])  # fmt: skip
    e = state.engine
    if e is not None:
        st = e.stats()
        metric("lmforge_requests_total", "counter", "Generation requests admitted by the engine.", [("", st["requests"])])
        metric("lmforge_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", st["prompt_tokens"])])
        metric("lmforge_generation_tokens_total", "counter", "Tokens generated.", [("", st["generated_tokens"])])
        metric("lmforge_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               [("", float(st["tokens_per_second"]))])  # fmt: skip
        metric("lmforge_queue_depth", "gauge", "Sequences waiting to be admitted.", [("", st["waiting"])])
        metric("lmforge_running_sequences", "gauge", "Sequences in the running batch.", [("", st["running"])])
        metric("lmforge_kv_blocks_in_use", "gauge", "KV cache blocks held by sequences.", [("", st["kv_blocks_used"])])
        metric("lmforge_kv_blocks_total", "gauge", "KV cache blocks in the pool.", [("", st["kv_blocks_total"])])
        metric("lmforge_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [("", st["prefix_cache_hit_tokens"])])  # fmt: skip
        metric("lmforge_preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of blocks.",
               [("", st["preemptions"])])  # fmt: skip
        metric("lmforge_failed_steps_total", "counter", "Engine steps that failed (their requests got errors).",
               [("", st["failed_steps"])])  # fmt: skip
        metric("lmforge_compiled_decode_graphs", "gauge", "Batch buckets whose compiled decode graph is built.",
               [("", st["compiled_decode_graphs"])])  # fmt: skip
        metric("lmforge_compiled_decode_steps_total", "counter", "Decode steps run on a compiled graph.",
               [("", st["compiled_decode_steps"])])  # fmt: skip
        metric("lmforge_compiled_decode_pending", "gauge", "Batch buckets queued for (or in) compilation.",
               [("", st["compiled_decode_pending"])])  # fmt: skip
    return "\n".join(lines) + "\n"


# --- building and running ------------------------------------------------------------------------
def model_id(path: str | Path | None) -> str:
    """The name a model is served under: its directory name or file stem."""
    from lmforge.checkpoints import resolve

    p = resolve(path)
    return p.stem if p.is_file() else p.name


def chat_page_html() -> str:
    """The chat page shipped in the package (serve/static/chat.html): no CDN, no build step."""
    from importlib.resources import files

    return files("lmforge.serve").joinpath("static", "chat.html").read_text(encoding="utf-8")


def build_app(
    model: str | Path | None = None,
    *,
    embedding_model: str | Path | None = None,
    api_key: str | None = None,
    max_queue: int = 1024,
    kv_cache_gb: float = 1.0,
    max_model_len: int | None = None,
    max_num_seqs: int = 64,
    dtype: str | torch.dtype = "auto",
    quantize: str = "auto",
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: Sequence[str] = (),
    grammar_file: str | Path | None = None,
    rag_db: str | Path | None = None,
    tensor_parallel: int = 1,
    max_prompt_tokens: int | None = None,
    compile: bool = False,
) -> FastAPI:
    """Load the checkpoints and build the app (an encoder given as MODEL is served for embeddings).
    ``served_model_name``: the name clients send as ``model`` (default: the checkpoint's file or
    directory name). ``tensor_parallel``: split the model over that many ``torchrun`` processes;
    rank 0's engine drives the others (``serve`` runs them). ``compile``: decode-only steps switch to
    compiled graphs as a background thread builds them (``lmforge serve``'s default)."""
    from lmforge.checkpoints import load_model, resolve
    from lmforge.tokenizer import load_tokenizer

    generator = embedder = None
    if tensor_parallel > 1 and quantize == "auto":
        quantize = "none"  # the shards are float linear layers (DTensor splits nn.Linear)
    m = load_model(model, dtype=dtype, quantize=quantize)
    if tensor_parallel > 1:
        from lmforge.parallel.tensor import init_tensor_parallel, tensor_parallel as split

        m = split(m, init_tensor_parallel(tensor_parallel))
    name = served_model_name or model_id(model)
    if m.config.arch == "encoder" and embedding_model is None:
        embedder = Embedder(m, load_tokenizer(resolve(model)), name)
    else:
        cfg = EngineConfig(kv_cache_gb=kv_cache_gb, max_queue=max_queue, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           compile=compile)  # fmt: skip
        generator = Engine(m, load_tokenizer(resolve(model)), cfg)
        if tensor_parallel > 1:
            import torch.distributed as dist

            from lmforge.parallel.tensor import lockstep

            if dist.get_rank() == 0:
                lockstep(generator)
        if embedding_model is not None:
            e = load_model(embedding_model, dtype=dtype)
            embedder = Embedder(e, load_tokenizer(resolve(embedding_model)), model_id(embedding_model))
    grammar = None
    if grammar_file is not None:  # a Lark grammar every reply must match, unless a request brings its own
        try:
            grammar = compile_grammar(grammar=Path(grammar_file).read_text(encoding="utf-8"))
        except ConstraintError as e:
            raise UserError(f"--grammar {grammar_file}: {e}") from None
    return create_app(generator, name if generator else None, embedder=embedder, api_key=api_key,
                      max_body_bytes=max_body_bytes, allowed_origins=allowed_origins, grammar=grammar,
                      rag=rag_db, max_prompt_tokens=max_prompt_tokens)  # fmt: skip


def serve(model: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Build the app and run it with uvicorn until interrupted (see ``build_app`` for the options)."""
    import uvicorn

    app = build_app(model, **kwargs)
    if kwargs.get("tensor_parallel", 1) <= 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    import torch.distributed as dist

    from lmforge.parallel.tensor import follow

    engine = app.state.server.engine
    try:
        if dist.get_rank() == 0:  # rank 0 serves HTTP; its engine's steps drive the other ranks
            try:
                uvicorn.run(app, host=host, port=port, log_level="info")
            finally:
                engine.runner.close()
        else:
            follow(engine)
    finally:
        dist.destroy_process_group()
