"""The HTTP server: OpenAI's API over a `Llama`'s engine, on starlette (routes, requests, responses) with
sse-starlette for streams; `tinyllama2 serve` runs it under uvicorn.

Every generation request becomes engine requests (one per choice) whose steps reach the event loop through
`on_step`; a client that goes away cancels them at once, streaming or not, and frees their slots.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Coroutine

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..generate import TextPieces, TokenStep
from ..llama import Llama, sequence_rngs
from . import openai as oa

if TYPE_CHECKING: from .constrain import Constraint

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
  model_name: str = "tinyllama2"
  api_key: str | None = None
  max_waiting: int = 64                # generation requests waiting for a slot before the server answers 503
  max_body_bytes: int = 4 << 20
  send_timeout_s: float = 30.0         # a streaming client that reads nothing for this long is dropped (and cancelled)
  shutdown_grace_s: float = 5.0        # streams get this long to finish when the server stops
  trusted_hosts: tuple[str, ...] = ()  # Host headers accepted (empty: any); a loopback server takes only its own names


class ServerState:
  """The model once loaded (None while loading), its settings and the server's counters."""

  def __init__(self, config: ServerConfig):
    self.config, self.llm, self.load_error = config, None, None
    self.loaded = threading.Event()
    self.active = 0   # engine requests in flight (holding a slot or waiting for one)
    self.registry = CollectorRegistry()
    self.requests = Counter("tinyllama2_requests", "HTTP requests answered", ["route", "status"],
                            registry=self.registry)
    self.tokens = Counter("tinyllama2_tokens", "tokens processed", ["kind"], registry=self.registry)
    Gauge("tinyllama2_requests_active", "engine requests in flight", registry=self.registry) \
      .set_function(lambda: self.active)
    for name, pick in (("slots_busy", 0), ("queue_length", 1)):
      Gauge(f"tinyllama2_{name}", f"engine {name.replace('_', ' ')}", registry=self.registry) \
        .set_function(lambda pick=pick: self.llm.engine.occupancy()[pick] if self.llm else 0)
    Gauge("tinyllama2_slots", "engine slots", registry=self.registry) \
      .set_function(lambda: self.llm.engine.slots if self.llm else 0)

  def model(self) -> Llama:
    if self.llm is None: raise oa.APIError(503, "the model is still loading; retry shortly", "server_error",
                                           code="model_loading")
    return self.llm


# ---- plumbing ---------------------------------------------------------------------------------------------------
FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


async def read_json(request: Request, limit: int) -> Any:
  """The body as JSON, at most `limit` bytes (413 past it, read or announced), 400 when it is not JSON. A body a
  web form could send (a browser sends those to any site without asking it first) is refused with 415."""
  kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if kind in FORM_TYPES:
    raise oa.APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {kind})",
                      code="unsupported_media_type")
  if (length := request.headers.get("content-length")) and length.isdigit() and int(length) > limit:
    raise oa.APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
  body = bytearray()
  try:
    async for chunk in request.stream():
      body += chunk
      if len(body) > limit: raise oa.APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
  except ClientDisconnect: raise oa.APIError(499, "the client closed the connection", code="client_closed") from None
  try: return json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise oa.APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
  except RecursionError: raise oa.APIError(400, "the request body is nested too deeply", code="invalid_json") from None


def _checked_model(state: ServerState, body) -> Llama:
  llm = state.model()
  name = body.get("model") if isinstance(body, dict) else None
  if name is not None and name != state.config.model_name:
    raise oa.APIError(404, f"model '{name}' not found; this server has '{state.config.model_name}'",
                      code="model_not_found", param="model")
  return llm


def _room(state: ServerState, llm: Llama) -> None:
  if state.active >= llm.engine.slots + state.config.max_waiting:
    raise oa.APIError(503, "the server is busy (too many requests waiting); retry shortly", "server_error",
                      code="server_busy")


def _fits(llm: Llama, job: oa.Job, param: str) -> None:
  ctx = llm.model.max_seq_len
  for ids in job.prompts:
    if len(ids) >= ctx:
      raise oa.APIError(400, f"this model's context is {ctx} tokens, the prompt has {len(ids)}: shorten it",
                        param=param, code="context_length_exceeded")


async def steps_of(state: ServerState, llm: Llama, job: oa.Job) -> AsyncIterator[tuple[int, TokenStep]]:
  """(choice index, step) of every choice of the job as the engine makes them; leaving early cancels them all."""
  loop, arrived = asyncio.get_running_loop(), asyncio.Queue()
  def deliver(index: int) -> Callable[[TokenStep | BaseException], None]:
    def put(step: TokenStep | BaseException) -> None:
      if isinstance(step, TokenStep) and job.logprobs is None:   # a [vocab] row per step: kept only for logprobs
        step = dataclasses.replace(step, logits=None)
      try: loop.call_soon_threadsafe(arrived.put_nowait, (index, step))
      except RuntimeError: pass   # the loop has closed: the server is gone
    return put
  requests, count = [], len(job.prompts) * job.n
  state.active += count
  try:
    for p, ids in enumerate(job.prompts):
      rngs = sequence_rngs(job.cfg.seed, job.n)
      for j in range(job.n):
        constraint = await anyio.to_thread.run_sync(_constraint, llm, job)   # the first builds llguidance's vocabulary
        requests.append(llm.submit(ids, job.cfg, rngs[j], on_step=deliver(p * job.n + j), constraint=constraint))
    live = len(requests)
    while live:
      index, step = await arrived.get()
      if isinstance(step, ValueError): raise oa.bad(None, str(step))   # this request's settings or constraint
      if isinstance(step, BaseException): raise step
      if step.token is not None: state.tokens.labels("generated").inc()
      yield index, step
      live -= step.finish_reason is not None
  finally:
    state.active -= count
    for r in requests: r.cancel()


def _constraint(llm: Llama, job: oa.Job) -> Constraint | None:
  if job.grammar is None: return None
  from .constrain import Constraint
  return Constraint(llm.tokenizer, job.grammar)


class Choice:
  """What one choice has produced so far: its text pieces and the steps that carried tokens."""

  def __init__(self, llm: Llama, prompt: list[int], job: oa.Job):
    self.tokenizer, self.top = llm.tokenizer, job.logprobs
    self.pieces = TextPieces(prompt, llm.tokenizer, job.cfg.stop)
    self.entries: list[oa.Entry] = []   # logprobs of the tokens so far (when asked for)
    self.finish_reason: str | None = None

  def add(self, step: TokenStep) -> str:
    if step.token is not None and self.top is not None:
      self.entries.append(oa.logprob_entry(self.tokenizer, step, self.top))
    self.finish_reason = step.finish_reason
    return self.pieces.add(step)


async def until_done(request: Request, work: Coroutine) -> Any:
  """Await `work` (a coroutine), cancelling it when the client disconnects first."""
  task = asyncio.ensure_future(work)
  try:
    while True:
      done, _ = await asyncio.wait({task}, timeout=0.2)
      if done: return task.result()
      if await request.is_disconnected():
        task.cancel()
        raise oa.APIError(499, "the client closed the connection", code="client_closed")
  finally:
    if not task.done(): task.cancel()


# ---- generation routes -----------------------------------------------------------------------------------------
async def _job(state: ServerState, llm: Llama, body: Any, chat: bool) -> oa.Job:
  if chat: job = oa.chat_job(body, lambda messages: llm.chat_template.encode(messages, llm.tokenizer))
  else: job = oa.completion_job(body, llm.tokenizer, llm.args.vocab_size)
  _fits(llm, job, "messages" if chat else "prompt")
  if job.response_format is not None:
    from .constrain import json_grammar   # llguidance: imported when a request asks for it
    try: job.grammar = await anyio.to_thread.run_sync(json_grammar, job.response_format)
    except ValueError as e: raise oa.bad("response_format", str(e)) from None
  state.tokens.labels("prompt").inc(sum(len(p) for p in job.prompts))
  return job


async def completions(request: Request, chat: bool) -> Response:
  state: ServerState = request.app.state.server
  body = await read_json(request, state.config.max_body_bytes)
  llm = _checked_model(state, body)
  job = await _job(state, llm, body, chat)
  _room(state, llm)
  rid = oa.new_id("chatcmpl" if chat else "cmpl")
  if job.stream:
    return EventSourceResponse(_stream(state, llm, job, rid, chat), ping=15, sep="\n",
                               send_timeout=state.config.send_timeout_s,
                               shutdown_grace_period=state.config.shutdown_grace_s)
  return JSONResponse(await until_done(request, _whole(state, llm, job, rid, chat)))


def _choices(llm: Llama, job: oa.Job) -> list[Choice]:
  return [Choice(llm, ids, job) for ids in job.prompts for _ in range(job.n)]


def _logprobs(job: oa.Job, entries: list[oa.Entry], chat: bool, offset: int = 0) -> dict | None:
  if job.logprobs is None: return None
  return oa.chat_logprobs(entries) if chat else oa.completion_logprobs(entries, offset)


def _usage(job: oa.Job, choices: list[Choice]) -> dict:
  return oa.usage(sum(len(p) for p in job.prompts), sum(len(c.pieces.new) for c in choices))


async def _whole(state: ServerState, llm: Llama, job: oa.Job, rid: str, chat: bool) -> dict:
  choices = _choices(llm, job)
  async for index, step in steps_of(state, llm, job): choices[index].add(step)
  out = []
  for i, c in enumerate(choices):
    text = c.pieces.text()
    if chat:
      out.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": _logprobs(job, c.entries, chat), "finish_reason": c.finish_reason})
    else:
      head = job.prompt_texts[i // job.n] if job.echo else ""
      out.append({"index": i, "text": head + text, "logprobs": _logprobs(job, c.entries, chat, len(head)),
                  "finish_reason": c.finish_reason})
  return oa.envelope("chat.completion" if chat else "text_completion", rid, state.config.model_name,
                     choices=out, usage=_usage(job, choices))


async def _stream(state: ServerState, llm: Llama, job: oa.Job, rid: str, chat: bool) -> AsyncIterator[dict]:
  kind, model = ("chat.completion.chunk" if chat else "text_completion"), state.config.model_name
  extra = {"usage": None} if job.include_usage else {}
  chunk = lambda choice: {"data": json.dumps(oa.envelope(kind, rid, model, choices=[choice], **extra))}
  choices = _choices(llm, job)
  if chat:
    for i in range(len(choices)):
      yield chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
  elif job.echo:
    for i in range(len(choices)):
      yield chunk({"index": i, "text": job.prompt_texts[i // job.n], "logprobs": None, "finish_reason": None})
  try:
    async for i, step in steps_of(state, llm, job):
      offset = (len(choices[i].pieces.text()) if not chat and job.logprobs is not None else 0) + \
        (len(job.prompt_texts[i // job.n]) if job.echo else 0)   # where the token's text begins
      piece = choices[i].add(step)
      lp = _logprobs(job, choices[i].entries[-1:], chat, offset) if step.token is not None else None
      if piece or lp:
        body = {"delta": {"content": piece}} if chat else {"text": piece}
        yield chunk({"index": i, **body, "logprobs": lp, "finish_reason": None})
      if step.finish_reason:
        body = {"delta": {}} if chat else {"text": ""}
        yield chunk({"index": i, **body, "logprobs": None, "finish_reason": step.finish_reason})
  except Exception as e:   # noqa: BLE001  (the stream has begun: the error goes into it)
    error = e if isinstance(e, oa.APIError) else oa.APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
    yield {"data": json.dumps(error.body())}
    return
  if job.include_usage:
    yield {"data": json.dumps(oa.envelope(kind, rid, model, choices=[], usage=_usage(job, choices)))}
  yield {"data": "[DONE]"}


async def chat_completions(request: Request) -> Response: return await completions(request, chat=True)


async def text_completions(request: Request) -> Response: return await completions(request, chat=False)


# ---- other routes ------------------------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
  state: ServerState = request.app.state.server
  body = await read_json(request, state.config.max_body_bytes)
  llm = _checked_model(state, body)
  ids, fmt = oa.embedding_inputs(body, llm.tokenizer, llm.args.vocab_size)
  if too_long := [len(i) for i in ids if len(i) > llm.model.max_seq_len]:
    raise oa.APIError(400, f"an input has {too_long[0]} tokens, over this model's context of "
                      f"{llm.model.max_seq_len}", param="input", code="context_length_exceeded")
  _room(state, llm)
  state.active += 1
  try: vectors = await anyio.to_thread.run_sync(llm.embed, ids)
  finally: state.active -= 1
  data = [oa.embedding_item(i, v, fmt) for i, v in enumerate(vectors)]
  n = sum(len(i) for i in ids)
  return JSONResponse({"object": "list", "data": data, "model": state.config.model_name,
                       "usage": {"prompt_tokens": n, "total_tokens": n}})


async def models(request: Request) -> Response:
  state: ServerState = request.app.state.server
  card = {"id": state.config.model_name, "object": "model", "created": 0, "owned_by": "tinyllama2",
          "max_model_len": state.llm.model.max_seq_len if state.llm else None}
  name = request.path_params.get("name")
  if name is None: return JSONResponse({"object": "list", "data": [card]})
  if name != state.config.model_name: raise oa.APIError(404, f"model '{name}' not found", code="model_not_found")
  return JSONResponse(card)


async def health(request: Request) -> Response:
  state: ServerState = request.app.state.server
  if state.llm is None: return JSONResponse({"status": "loading"}, status_code=503)
  busy, waiting = state.llm.engine.occupancy()
  return JSONResponse({"status": "ok", "slots": state.llm.engine.slots, "slots_busy": busy, "waiting": waiting})


async def metrics(request: Request) -> Response:
  return Response(generate_latest(request.app.state.server.registry), media_type=CONTENT_TYPE_LATEST)


async def tokenize(request: Request) -> Response:
  state: ServerState = request.app.state.server
  body = await read_json(request, state.config.max_body_bytes)
  if not isinstance(body, dict) or not isinstance(body.get("content"), str):
    raise oa.bad("content", "POST /tokenize takes {\"content\": \"text\", \"add_special\": false}")
  special = body.get("add_special", False)
  if not isinstance(special, bool): raise oa.bad("add_special", "'add_special' must be true or false")
  return JSONResponse({"tokens": state.model().tokenizer.encode(body["content"], bos=special)})


async def detokenize(request: Request) -> Response:
  state: ServerState = request.app.state.server
  body = await read_json(request, state.config.max_body_bytes)
  llm = state.model()
  tokens = body.get("tokens") if isinstance(body, dict) else None
  if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
    raise oa.bad("tokens", "POST /detokenize takes {\"tokens\": [ids]}")
  if outside := [t for t in tokens if not 0 <= t < llm.args.vocab_size]:
    raise oa.bad("tokens", f"token ids {outside[:5]} are outside the vocabulary (0..{llm.args.vocab_size - 1})")
  return JSONResponse({"content": llm.tokenizer.decode(tokens)})


PAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}


async def page(request: Request) -> Response: return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


# ---- the application -------------------------------------------------------------------------------------------
def _authorized(state: ServerState, request: Request) -> bool:
  """The API key, where the server has one, on everything but the page, its files and /health."""
  key, path = state.config.api_key, request.url.path
  if key is None or path in ("/", "/health") or path.startswith("/static/"): return True
  scheme, _, given = request.headers.get("authorization", "").partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
          "/tokenize", "/detokenize", "/")


def route_label(path: str) -> str:
  """The metrics label of a path: its route, so that unknown paths do not each make a time series."""
  if path in ROUTES: return path
  if path.startswith("/v1/models/"): return "/v1/models/{name}"
  return "/static" if path.startswith("/static/") else "other"


async def error_response(request: Request, e: Exception) -> Response:
  state: ServerState = request.app.state.server
  if isinstance(e, HTTPException):
    e = oa.APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                    "invalid_request_error", code="not_found" if e.status_code == 404 else None)
  elif not isinstance(e, oa.APIError):
    e = oa.APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
  state.requests.labels(route_label(request.url.path), str(e.status)).inc()
  headers = {"Retry-After": "1"} if e.status == 503 else None
  return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Guard:
  """ASGI middleware: the API key, and every request counted (errors are counted where they are answered)."""

  def __init__(self, app, state: ServerState):
    self.app, self.state = app, state

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http": return await self.app(scope, receive, send)
    request = Request(scope, receive)
    if not _authorized(self.state, request):
      e = oa.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
      self.state.requests.labels(route_label(request.url.path), "401").inc()
      return await JSONResponse(e.body(), status_code=401)(scope, receive, send)
    status = {}
    async def watch(message):
      if message["type"] == "http.response.start": status["code"] = message["status"]
      await send(message)
    await self.app(scope, receive, watch)
    if status.get("code", 500) < 400: self.state.requests.labels(route_label(request.url.path), str(status["code"])).inc()


def create_app(config: ServerConfig, load: Callable[[], Llama]) -> Starlette:
  """The server's application; `load` runs in a thread at start-up (/health answers 503 until it returns)."""
  state = ServerState(config)

  def loader() -> None:
    try: state.llm = load()
    except BaseException as e: state.load_error = e   # noqa: BLE001  (reported by whoever runs the server)
    finally: state.loaded.set()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    threading.Thread(target=loader, name="tinyllama2-load", daemon=True).start()
    yield

  routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", text_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models), Route("/v1/models/{name:path}", models),
            Route("/health", health), Route("/metrics", metrics),
            Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"]),
            Route("/", page), Mount("/static", StaticFiles(directory=STATIC), name="static")]
  app = Starlette(routes=routes, lifespan=lifespan,
                  exception_handlers={Exception: error_response, HTTPException: error_response,
                                      oa.APIError: error_response})
  app.state.server = state
  app.add_middleware(Guard, state=state)
  if config.trusted_hosts:   # outermost: a page on another site reaching us by DNS rebinding is turned away first
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.trusted_hosts))
  return app

