"""Text → unit vectors for dense retrieval: the model's own embeddings (`Llama.embed`, the function behind the
server's /v1/embeddings) or any OpenAI-compatible embeddings endpoint."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

if TYPE_CHECKING: from ..llama import Llama


class Embedder(Protocol):
  def embed(self, texts: Sequence[str]) -> np.ndarray: ...   # [len(texts), dim] float32, rows of unit length
  def describe(self) -> dict: ...                             # what an index records, to embed its queries alike


def unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ModelEmbedder:
  """`Llama.embed` of each text; a text longer than the model's context is embedded in context-sized windows
  (each starting with BOS) whose embeddings are averaged, weighted by their tokens."""

  def __init__(self, llm: Llama, model_path: str, options: dict | None = None) -> None:
    """model_path and options (from_pretrained's: tokenizer, dtype, adapter, quantize, max_seq_len) are what the
    index records, so that its questions are embedded by the same model."""
    self.llm, self.model_path, self.options = llm, model_path, dict(options or {})

  def _windows(self, text: str) -> list[list[int]]:
    tok = self.llm.tokenizer
    body, room = tok.encode(text, bos=False), self.llm.model.max_seq_len - 1
    return [[tok.bos_id] + body[i:i + room] for i in range(0, max(len(body), 1), room)]

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.llm.args.dim), dtype=np.float32)
    for i, text in enumerate(texts):
      windows = self._windows(text)
      vectors = self.llm.embed(windows)
      out[i] = np.asarray([len(w) for w in windows], dtype=np.float32) @ vectors
    return unit_rows(out)

  def describe(self) -> dict:
    return {"kind": "model", "model": self.model_path, "options": self.options, "dim": self.llm.args.dim}


class EndpointEmbedder:
  """POST {url}/embeddings as OpenAI's API defines it (url as an OpenAI client's base_url, e.g.
  http://localhost:8000/v1), `batch` texts a request; api_key defaults to $OPENAI_API_KEY, as OpenAI's client."""

  def __init__(self, url: str, model: str = "default", api_key: str | None = None, batch: int = 32,
               timeout: float = 600.0) -> None:
    self.url, self.model, self.batch, self.timeout = url.rstrip("/"), model, batch, timeout
    self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

  def _post(self, texts: list[str]) -> list[list[float]]:
    body = json.dumps({"input": texts, "model": self.model, "encoding_format": "float"}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key: headers["Authorization"] = f"Bearer {self.api_key}"
    req = urllib.request.Request(self.url + "/embeddings", data=body, headers=headers, method="POST")
    where = f"embeddings endpoint {self.url}"
    try:
      with urllib.request.urlopen(req, timeout=self.timeout) as r: answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
      raise ValueError(f"{where}: HTTP {e.code}: {_error_message(e.read())}") from None
    except (urllib.error.URLError, OSError) as e:
      raise ValueError(f"{where} cannot be reached ({getattr(e, 'reason', e)}); is the server running?") from None
    except json.JSONDecodeError: raise ValueError(f"{where} answered something that is not JSON") from None
    try:
      rows = sorted(answer["data"], key=lambda d: d["index"])
      vectors = [row["embedding"] for row in rows]
    except (KeyError, TypeError): raise ValueError(f"{where} answered without OpenAI's data[].embedding") from None
    if len(vectors) != len(texts): raise ValueError(f"{where} returned {len(vectors)} embeddings for {len(texts)} inputs")
    return vectors

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    rows: list[list[float]] = []
    for lo in range(0, len(texts), self.batch): rows += self._post(list(texts[lo:lo + self.batch]))
    if len({len(r) for r in rows}) > 1: raise ValueError(f"embeddings endpoint {self.url} returned vectors of different sizes")
    return unit_rows(np.asarray(rows, dtype=np.float32).reshape(len(texts), -1))

  def describe(self) -> dict: return {"kind": "endpoint", "url": self.url, "model": self.model}


def _error_message(body: bytes) -> str:
  try: return str(json.loads(body)["error"]["message"])
  except (ValueError, KeyError, TypeError): return " ".join(body.decode("utf-8", "replace").split())[:200] or "no message"
