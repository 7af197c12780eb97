"""Replicas of `tinyllama2 serve` behind Ray Serve (the `ray` extra): model replicas spread over a Ray cluster's
machines (each reserves `--replica-cpus` of one), Ray's HTTP proxy in front, the same OpenAI routes and chat page.

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

from .app import ServerConfig

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
  """The length of the longest common prefix of a and b (a binary search over slice comparisons, which run in C)."""
  lo, hi = 0, min(len(a), len(b))
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]: lo = mid
    else: hi = mid - 1
  return lo


class PrefixAffinityRouter(RequestRouter):
  """Picks the replica for a request: the one whose recent requests share the longest prefix with it (at least
  `min_shared_chars`; ties to the less busy), unless it has more than `max_imbalance` requests in flight beyond the
  least busy replica; else the least busy one. In flight: Ray's own count of the requests this router sent to each
  replica (its queue-length cache)."""

  def initialize_state(self, min_shared_chars: int = 16, max_imbalance: int = 4, remembered: int = 64) -> None:
    self.min_shared, self.max_imbalance, self.remembered = min_shared_chars, max_imbalance, remembered
    self.texts: dict[ReplicaID, deque[str]] = {}

  def _load(self, replica: RunningReplica) -> int: return self.replica_queue_len_cache.get(replica.replica_id) or 0

  async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                            pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
    if not candidate_replicas: return []
    text = _text_of(pending_request)
    least = min(map(self._load, candidate_replicas))
    shared = {r.replica_id: max((shared_prefix(text, t) for t in self.texts.get(r.replica_id, ())), default=0)
              for r in candidate_replicas}
    best = max(candidate_replicas, key=lambda r: (shared[r.replica_id], -self._load(r)))
    if shared[best.replica_id] < self.min_shared or self._load(best) - least > self.max_imbalance:
      best = random.choice([r for r in candidate_replicas if self._load(r) == least])
    if text: self._remember(best.replica_id, text[:8192])
    # the others after it: a replica that turns the request away (full) does not hold it up
    return [[best], [r for r in candidate_replicas if r is not best]]

  def _remember(self, replica_id: ReplicaID, text: str) -> None:
    seen = self.texts.setdefault(replica_id, deque(maxlen=self.remembered))
    if not seen or seen[-1] != text: seen.append(text)   # (a request chosen again after a refusal counts once)

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
    started = False
    try:
      while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
          started = True
          yield {"status": message["status"], "headers": [*message.get("headers", []),
                                                          (REPLICA_HEADER.encode(), self.name.encode())]}
        elif message["type"] == "http.response.body" and message.get("body"): yield message["body"]
      if not started: task.result()   # (once a response started, the app has answered its own error)
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
    body = await _body_prefix(request, ServerConfig.max_body_bytes)
    forwarded = Forwarded(request.method, request.url.path, request.scope.get("query_string", b""),
                          list(request.scope["headers"]), body, prefix_text(body))
    pieces = self.replicas.options(stream=True).forward.remote(forwarded)
    head = await pieces.__anext__()

    async def rest() -> AsyncIterator[bytes]:
      try:
        async for piece in pieces: yield piece
      finally: pieces.cancel()

    response = StreamingResponse(rest(), status_code=head["status"])
    # the app's headers as they are (repeated ones too); the length is the proxy's to send, as it streams
    response.raw_headers = [(k, v) for k, v in head["headers"]
                            if k.lower() not in (b"content-length", b"transfer-encoding")]
    return response


async def _body_prefix(request, limit: int) -> bytes:
  """The body, or its first limit + 1 bytes when it is longer (the replica then answers 413, as `tinyllama2 serve`
  does, and the ingress never holds more than that)."""
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limit: break
  return bytes(body[:limit + 1])


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


def check_resources(cpus: float, replicas: int, replica_cpus: float, joined: bool) -> None:
  """A one-line error where the replicas cannot all start (Ray would wait for them forever); a cluster that was
  joined may grow (an autoscaler), so there it is only a warning."""
  need = replicas * replica_cpus
  if need <= cpus: return
  message = (f"--replicas {replicas} x --replica-cpus {replica_cpus:g} needs {need:g} CPUs but the Ray cluster has "
             f"{cpus:g}: use fewer replicas, or a smaller --replica-cpus (0 lets replicas share the CPUs)")
  if not joined: raise ValueError(message)
  logging.getLogger(__name__).warning("%s; waiting for the cluster to grow", message)


@contextlib.contextmanager
def running(args: argparse.Namespace, replicas: int, host: str, port: int, replica_cpus: float = 1.0) -> Iterator[None]:
  """The application served at http://host:port while the block runs: on the Ray cluster $RAY_ADDRESS names, else
  on a local Ray started here (and stopped after)."""
  import ray
  cluster = os.environ.get("RAY_ADDRESS")   # Ray's own variable: a cluster to join
  ray.init(address=cluster or "local", include_dashboard=False, logging_level=logging.WARNING)
  try:
    check_resources(ray.cluster_resources().get("CPU", 0), replicas, replica_cpus, joined=bool(cluster))
    serve.start(http_options={"host": host, "port": port})
    try: serve.run(application(args, replicas, replica_cpus), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:   # a replica that failed to load the model, say (its traceback is in Ray's logs)
      reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
      raise OSError(f"the model replicas did not start ({reason}); their errors are in Ray's serve logs "
                    "(/tmp/ray/session_latest/logs/serve on each machine)") from None
    yield
  finally:
    if cluster: serve.delete(APP_NAME)
    else: serve.shutdown()
    ray.shutdown()
