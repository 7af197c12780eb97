"""A real `tinyllama2 serve` process on a free localhost port, for the server's tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def need_serve_extra() -> None:
  for module in ("starlette", "uvicorn", "sse_starlette", "prometheus_client", "httpx"):
    pytest.importorskip(module, reason=f"the serve extra is not installed ({module}): pip install -e '.[serve,dev]'")


class Server:
  """`tinyllama2 serve ARGS --port 0` in a subprocess: `url` once /health says the model is ready."""

  def __init__(self, *args: str, ready: bool = True, timeout: float = 180.0):
    need_serve_extra()
    import httpx
    from tinyllama2.devices import USER_DEV, child_env
    # the device a user's server gets (their DEV, else the CPU): once tinygrad has picked a default device it
    # writes it into this process's DEV, which the server would inherit
    env = dict(child_env(USER_DEV or "CPU"), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")   # a crash prints its stack
    self.proc = subprocess.Popen([sys.executable, "-m", "tinyllama2.cli", "serve", "--port", "0", *args], cwd=REPO,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.stderr: list[str] = []
    threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
    lines = []   # the address comes in the first line starting with "tinyllama2: listening" (Ray may print first)
    while (line := self.proc.stdout.readline()) and not line.startswith("tinyllama2: listening"): lines.append(line)
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
      self.proc.kill()
      raise RuntimeError(f"the server did not start: {''.join(lines) + line!r} {''.join(self.stderr)}")
    self.url = f"http://{m.group(1)}:{m.group(2)}"
    deadline = time.time() + timeout
    while ready and time.time() < deadline:
      if self.proc.poll() is not None: raise RuntimeError(f"the server exited: {''.join(self.stderr)}")
      try:
        if httpx.get(self.url + "/health", timeout=5).status_code == 200: break
      except httpx.HTTPError: pass
      time.sleep(0.2)
    else:
      if ready: raise RuntimeError("the server did not become ready")

  def stop(self, timeout: float = 30.0) -> int:
    """SIGTERM, then the exit code."""
    if self.proc.poll() is None: self.proc.send_signal(signal.SIGTERM)
    try: return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
