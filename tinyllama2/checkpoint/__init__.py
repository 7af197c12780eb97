"""Checkpoint formats: detect, load into (ModelArgs, Meta-named numpy weights), save."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelArgs
from . import gguf, hf, hub, llama2c, meta


@dataclass
class Checkpoint:
  args: ModelArgs
  weights: dict[str, np.ndarray]
  tokenizer_path: Path | None   # a tokenizer.model found beside the weights
  format: str
  tokenizer_proto: bytes | None = None   # a SentencePiece model built from the file's own vocabulary (GGUF)

  def float_weights(self) -> dict[str, np.ndarray]:
    """All weights as float arrays (quantized GGUF blocks dequantized)."""
    return {k: v.dequantize() if isinstance(v, gguf.QuantizedWeight) else v for k, v in self.weights.items()}


def detect_format(path: Path) -> str:
  if not path.exists(): raise FileNotFoundError(f"model not found: {path}")
  if hf.is_hf_dir(path): return "hf"
  if meta.is_meta_dir(path): return "meta"
  if path.is_file() and path.suffix == ".bin": return "llama2c"
  if path.is_file() and path.suffix == ".gguf": return "gguf"
  if path.is_dir():
    raise ValueError(f"{path}: neither config.json nor params.json + consolidated.*.pth here; expected a Hugging "
                     "Face model directory, a Meta checkpoint directory, a .gguf or a llama2.c .bin file")
  raise ValueError(f"{path}: unknown model format (expected a Hugging Face directory, a .gguf or a llama2.c .bin)")


def load_checkpoint(path: str | Path) -> Checkpoint:
  """A checkpoint from a path, or from a Hugging Face repo id ("ORG/NAME") in the local Hugging Face cache."""
  path = hub.resolve(path)
  fmt = detect_format(path)
  proto = None
  if fmt == "hf": args, weights = hf.load(path)
  elif fmt == "meta": args, weights = meta.load(path)
  elif fmt == "gguf":
    f = gguf.read(path)
    args, weights = gguf.load(f)
    if "tokenizer.ggml.tokens" in f.metadata: proto = gguf.sentencepiece_proto(f)
  else: args, weights = llama2c.load(path)
  folder = path if path.is_dir() else path.parent
  tok = folder / "tokenizer.model"
  return Checkpoint(args, weights, tok if tok.is_file() and fmt != "gguf" else None, fmt, proto)
