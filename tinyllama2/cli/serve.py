"""`tinyllama2 serve`: an OpenAI-compatible HTTP server and a chat page over one model (the `serve` extra)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path

from .common import add_model_args, float_flag, int_flag, load_model

HELP = "serve a model over OpenAI's HTTP API, with a chat page at /"


def add_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p, required=False)
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
  p.add_argument("--port", type=int_flag(0), default=8000, help="port (0: any free one; the address is printed)")
  p.add_argument("--slots", type=int_flag(1), help="sequences generated at once (default: up to 4, as memory allows)")
  keys = p.add_mutually_exclusive_group()
  keys.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
  keys.add_argument("--api-key-file", help="read the API key from this file (keeps it out of `ps`)")
  p.add_argument("--model-alias", help="the model's name in the API (default: the model folder's or file's name)")
  p.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto",
                 help="chat format (auto: Llama-2's for chat models, plain text otherwise)")
  p.add_argument("--max-waiting", type=int_flag(0), default=64,
                 help="requests that may wait for a slot; past them the server answers 503")
  p.add_argument("--shutdown-timeout", type=int_flag(0), default=5,
                 help="seconds running requests get to finish on SIGTERM/Ctrl-C before they are cancelled")
  p.add_argument("--ray", action="store_true",
                 help="serve replicas of the model behind Ray Serve (the ray extra; joins $RAY_ADDRESS's cluster, "
                      "else starts a local one)")
  p.add_argument("--replicas", type=int_flag(1), default=2, help="with --ray: model replicas (default 2)")
  p.add_argument("--replica-cpus", type=float_flag(0), default=1.0,
                 help="with --ray: CPUs Ray reserves for each replica, which spreads them over machines (default 1)")


def api_key(a: argparse.Namespace) -> str | None:
  if a.api_key_file is None: return a.api_key
  key = Path(a.api_key_file).read_text(encoding="utf-8").strip()
  if not key: raise ValueError(f"--api-key-file {a.api_key_file} is empty")
  return key


def listening_socket(host: str, port: int) -> socket.socket:
  """The server's socket, bound here so that a port in use is a one-line error before the model loads."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try: sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
  sock.listen(2048)
  return sock


def server_config(a: argparse.Namespace):
  """The server's settings from the flags (the model defaults to the bundled one)."""
  from .. import DEFAULT_MODEL
  from ..serve.app import ServerConfig
  a.model = a.model or str(DEFAULT_MODEL)
  loopback = a.host in ("127.0.0.1", "localhost", "::1") or a.host.startswith("127.")
  return ServerConfig(model_name=a.model_alias or Path(a.model.rstrip("/")).name, api_key=api_key(a),
                      max_waiting=a.max_waiting, shutdown_grace_s=max(0.0, a.shutdown_timeout - 0.5),
                      trusted_hosts=("localhost", "127.0.0.1", "[::1]", a.host) if loopback else ())


def model_loader(a: argparse.Namespace):
  """A function loading the model the flags name, with the chat format they ask for."""
  from .chat import is_chat_model
  from ..tokenizer import Llama2ChatTemplate, PlainTemplate

  def load():
    llm = load_model(a)
    chat = a.template == "llama2" or (a.template == "auto" and is_chat_model(a.model))
    llm.chat_template = Llama2ChatTemplate() if chat else PlainTemplate()
    print(f"tinyllama2: model {Path(a.model.rstrip('/')).name} ready ({llm.engine.slots} slots, context "
          f"{llm.model.max_seq_len})", file=sys.stderr, flush=True)
    return llm
  return load


def main(a: argparse.Namespace) -> None:
  try:
    import uvicorn
    from ..serve.app import create_app
  except ImportError as e:
    raise ValueError(f"tinyllama2 serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
  config = server_config(a)   # (checks the flags, e.g. an empty --api-key-file, before anything starts)
  if a.ray: return serve_on_ray(a)
  app = create_app(config, model_loader(a))
  sock = listening_socket(a.host, a.port)
  host, port = sock.getsockname()[:2]
  server = graceful_server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=a.shutdown_timeout))
  state = app.state.server
  threading.Thread(target=_stop_if_load_fails, args=(state, server), daemon=True).start()
  print(f"tinyllama2: listening on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
  server.run(sockets=[sock])
  if state.load_error is not None: raise state.load_error


def serve_on_ray(a: argparse.Namespace) -> None:
  """--ray: the replicas and Ray's HTTP proxy on a free or given port, until SIGTERM/Ctrl-C."""
  try: from ..serve import ray as ray_serving
  except ImportError as e:
    raise ValueError(f"tinyllama2 serve --ray needs the ray extra ({e.name} is missing): pip install -e '.[ray]'") from None
  from ..checkpoint import detect_format, hub
  from .chat import is_chat_model
  # what the replicas would take from the flags as given: the model's name, its chat format, the API key
  a.model_alias = a.model_alias or Path(a.model.rstrip("/")).name
  a.api_key, a.api_key_file = api_key(a), None
  resolved = str(hub.resolve(a.model))   # a missing model is an error before Ray starts
  detect_format(Path(resolved))
  if a.template == "auto": a.template = "llama2" if is_chat_model(a.model) or is_chat_model(resolved) else "plain"
  a.model = resolved
  for name in ("model", "tokenizer", "adapter"):   # the replicas' processes may start in another folder
    if getattr(a, name) and Path(getattr(a, name)).exists(): setattr(a, name, str(Path(getattr(a, name)).resolve()))
  sock = listening_socket(a.host, a.port)   # a port in use is an error before Ray starts
  host, port = sock.getsockname()[:2]
  sock.close()
  stop = threading.Event()
  with ray_serving.running(a, a.replicas, host, port, a.replica_cpus):
    for sig in (signal.SIGINT, signal.SIGTERM): signal.signal(sig, lambda *_: stop.set())   # (after Ray's own)
    print(f"tinyllama2: listening on http://{host}:{port} ({a.replicas} replicas on Ray Serve; chat page at /, API "
          "at /v1)", flush=True)
    stop.wait()


def _stop_if_load_fails(state, server) -> None:
  state.loaded.wait()
  if state.load_error is not None: server.should_exit = True


def graceful_server(config):
  """uvicorn's Server, stopping on SIGTERM/SIGINT and then returning (exit code 0) rather than re-raising the signal
  as uvicorn does; relies on uvicorn's Server.capture_signals / handle_exit (uvicorn 0.30 - 0.54)."""
  import uvicorn

  class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
      if threading.current_thread() is not threading.main_thread():
        yield
        return
      saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try: yield
      finally:
        for sig, handler in saved.items(): signal.signal(sig, handler)

  return Server(config)
