"""Replicas of `tinyllama2 serve` behind Ray Serve (the `ray` extra): one model replica per device or machine, Ray's
HTTP proxy in front, the same OpenAI routes and chat page.

An `Ingress` deployment takes each HTTP request, reads the text a prefix cache would hold for it (the prompt, or the
messages in order) and forwards the request to a `ModelReplica` through a handle whose router is
`PrefixAffinityRouter`: a request goes to the replica that recently served the longest shared prefix of its text
(the next turn of a conversation finds its earlier turns in that replica's slots, as Ray Serve LLM's and vLLM's
prefix-aware routers do), unless that replica is much busier than another; else to the least busy replica. Each
replica runs the application of serve/app.py in-process, so its answers are those of `tinyllama2 serve`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

APP_NAME = "tinyllama2"
REPLICA_HEADER = "x-tinyllama2-replica"   # which replica answered (for logs and tests)


@dataclass
class Forwarded:
  """One HTTP request as the ingress hands it to a replica; `prefix_text` is what the router matches."""
  method: str
  path: str
  query: bytes
  headers: list[tuple[bytes, bytes]]
  body: bytes
  prefix_text: str


def prefix_text(body: bytes) -> str:
  """The text whose keys and values a replica keeps after serving this request: a completion's prompt, or a chat's
  messages (role and content) in order, so that a conversation's next turn starts with its previous turn's text."""
  try: data = json.loads(body)
  except (ValueError, UnicodeDecodeError): return ""
  if not isinstance(data, dict): return ""
  if isinstance(data.get("messages"), list):
    return "".join(f"<{m.get('role')}>{m.get('content')}" for m in data["messages"] if isinstance(m, dict))
  prompt = data.get("prompt")
  return prompt if isinstance(prompt, str) else ""


def shared_prefix(a: str, b: str) -> int:
  n = min(len(a), len(b))
  for i in range(n):
    if a[i] != b[i]: return i
  return n


class PrefixAffinityRouter(RequestRouter):
  """Picks the replica for a request: the one whose recent requests share the longest prefix with it (at least
  `min_shared_chars`), unless it has more than `max_imbalance` requests in flight beyond the least busy replica;
  else the least busy one. In-flight counts are this router's own (requests it routed, until they complete)."""

  def initialize_state(self, min_shared_chars: int = 16, max_imbalance: int = 4, remembered: int = 64) -> None:
    self.min_shared, self.max_imbalance, self.remembered = min_shared_chars, max_imbalance, remembered
    self.texts: dict[ReplicaID, deque[str]] = {}
    self.in_flight: dict[ReplicaID, int] = {}
    self.routed: dict[str, ReplicaID] = {}   # internal request id -> the replica chosen for it

  async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                            pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
    if not candidate_replicas: return []
    text = _text_of(pending_request)
    load = {r.replica_id: self.in_flight.get(r.replica_id, 0) for r in candidate_replicas}
    least = min(load.values())
    best, best_shared = None, 0
    for r in candidate_replicas:
      shared = max((shared_prefix(text, t) for t in self.texts.get(r.replica_id, ())), default=0)
      if shared > best_shared: best, best_shared = r, shared
    if best is None or best_shared < self.min_shared or load[best.replica_id] - least > self.max_imbalance:
      best = random.choice([r for r in candidate_replicas if load[r.replica_id] == least])
    if pending_request is not None: self._routing(pending_request, best.replica_id, text)
    return [[best]]

  def _routing(self, pending_request: PendingRequest, replica_id: ReplicaID, text: str) -> None:
    request_id = pending_request.metadata.internal_request_id
    if (before := self.routed.get(request_id)) is not None: self.in_flight[before] -= 1   # chosen again (a retry)
    self.routed[request_id] = replica_id
    self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1
    if text: self.texts.setdefault(replica_id, deque(maxlen=self.remembered)).append(text[:8192])

  def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
    if (chosen := self.routed.pop(internal_request_id, None)) is not None: self.in_flight[chosen] -= 1

  def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
    super().on_replica_actor_died(replica_id)
    self.texts.pop(replica_id, None)


def _text_of(pending_request: PendingRequest | None) -> str:
  """The prefix text of a request's Forwarded argument (found by its attribute: Ray may hand the router a copy of
  the class, loaded apart from this module's)."""
  if pending_request is None: return ""
  return next((a.prefix_text for a in pending_request.args if isinstance(getattr(a, "prefix_text", None), str)), "")


class ModelReplica:
  """One copy of the model with the server's application (serve/app.py), loaded before the replica takes requests."""

  def __init__(self, args: argparse.Namespace):
    from ..cli.serve import model_loader, server_config
    from .app import create_app
    load = model_loader(args)
    self.app = create_app(server_config(args), load)
    state = self.app.state.server
    state.llm = load()   # here, not in the app's start-up thread: Ray routes to a replica once its __init__ returns
    state.loaded.set()
    self.name = serve.get_replica_context().replica_id.unique_id

  async def forward(self, request: Forwarded) -> AsyncIterator[Any]:
    """Run the request through the application: first {"status", "headers"}, then the body in pieces. A client
    that goes away (the ingress stops reading) reaches the application as a disconnect, which cancels its work."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
      nonlocal body_sent
      if not body_sent:
        body_sent = True
        return {"type": "http.request", "body": request.body, "more_body": False}
      await disconnected.wait()
      return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "query_string": request.query,
             "headers": request.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "root_path": ""}
    task = asyncio.ensure_future(self.app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
      while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
          headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
          yield {"status": message["status"], "headers": headers + [(REPLICA_HEADER, self.name)]}
        elif message["type"] == "http.response.body" and message.get("body"): yield message["body"]
      task.result()
    finally:
      disconnected.set()
      if not task.done():   # the application cancels its work on the disconnect; cancelled itself after 5 s
        with contextlib.suppress(Exception): await asyncio.wait_for(task, timeout=5)


class Ingress:
  """The HTTP entry behind Ray's proxy: forwards every request to a model replica chosen by PrefixAffinityRouter
  and streams the answer back."""

  def __init__(self, replicas):
    self.replicas = replicas

  async def __call__(self, request):
    from starlette.responses import StreamingResponse
    body = await request.body()
    forwarded = Forwarded(request.method, request.url.path, request.url.query.encode(),
                          [(k.encode(), v.encode()) for k, v in request.headers.items()], body, prefix_text(body))
    pieces = self.replicas.options(stream=True).forward.remote(forwarded)
    head = await pieces.__anext__()
    headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}

    async def rest() -> AsyncIterator[bytes]:
      try:
        async for piece in pieces: yield piece
      finally: pieces.cancel()

    return StreamingResponse(rest(), status_code=head["status"], headers=headers)


def application(args: argparse.Namespace, replicas: int, replica_cpus: float = 1.0):
  """The Ray Serve application: `replicas` model replicas (each reserving `replica_cpus` of a Ray node, so that Ray
  spreads them over the machines of a cluster) behind one ingress."""
  model = serve.deployment(ModelReplica, name="tinyllama2-model", num_replicas=replicas,
                           max_ongoing_requests=max(16, args.max_waiting + (args.slots or 4)),
                           ray_actor_options={"num_cpus": replica_cpus},
                           graceful_shutdown_timeout_s=args.shutdown_timeout, graceful_shutdown_wait_loop_s=0.5,
                           request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter))
  ingress = serve.deployment(Ingress, name="tinyllama2-ingress", max_ongoing_requests=1024,
                             ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=args.shutdown_timeout,
                             graceful_shutdown_wait_loop_s=0.5)
  return ingress.bind(model.bind(args))


@contextlib.contextmanager
def running(args: argparse.Namespace, replicas: int, host: str, port: int, replica_cpus: float = 1.0) -> Iterator[None]:
  """The application served at http://host:port while the block runs: on the Ray cluster $RAY_ADDRESS names, else
  on a local Ray started here (and stopped after)."""
  import ray
  joined = bool(os.environ.get("RAY_ADDRESS"))
  ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
  try:
    serve.start(http_options={"host": host, "port": port})
    try: serve.run(application(args, replicas, replica_cpus), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:   # a replica that failed to load the model, say (its traceback is in Ray's logs)
      raise OSError(f"the model replicas did not start ({e}); their errors are in Ray's serve logs "
                    "(/tmp/ray/session_latest/logs/serve on each machine)") from None
    yield
  finally:
    if joined: serve.delete(APP_NAME)
    else: serve.shutdown()
    ray.shutdown()
