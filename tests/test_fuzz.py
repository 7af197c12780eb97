"""Truncated or bit-flipped checkpoints of every format: a clean ValueError or a successful load, never another
exception type, a hang or a giant allocation."""
import time

import numpy as np

from conftest import SHARED, STORIES, need
from tinyllama2.checkpoint import hf, llama2c, load_checkpoint, meta

TINY_GGUF = SHARED / "gguf" / "llama-2-tiny-random.gguf"


def mutations(raw: bytes, seed: int, n: int = 50):
  """Half truncations at random points, half single bit flips (biased toward the header, where parsing happens)."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    if i % 2 == 0: yield raw[: int(rng.integers(0, len(raw)))]
    else:
      b = bytearray(raw)
      pos = int(rng.integers(0, min(len(b), 4096))) if i % 4 == 1 else int(rng.integers(0, len(b)))
      b[pos] ^= 1 << int(rng.integers(0, 8))
      yield bytes(b)


def check_all(path, raw: bytes, seed: int):
  outcomes = {"ok": 0, "error": 0}
  for data in mutations(raw, seed):
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
      load_checkpoint(path.parent if path.name in ("model.safetensors", "consolidated.00.pth") else path)
      outcomes["ok"] += 1
    except ValueError:
      outcomes["error"] += 1
    assert time.perf_counter() - t0 < 10
  assert outcomes["error"] >= 20   # every truncation must be caught
  path.write_bytes(raw)


def test_fuzz_llama2c(tmp_path):
  need(STORIES)
  check_all(tmp_path / "m.bin", STORIES.read_bytes(), seed=1)


def test_fuzz_gguf(tmp_path):
  need(TINY_GGUF)
  check_all(tmp_path / "m.gguf", TINY_GGUF.read_bytes(), seed=2)


def test_fuzz_safetensors(tmp_path):
  need(STORIES)
  args, weights = llama2c.load(STORIES)
  hf.save(tmp_path, args, weights)
  check_all(tmp_path / "model.safetensors", (tmp_path / "model.safetensors").read_bytes(), seed=3)


def test_fuzz_meta_pth(tmp_path):
  need(STORIES)
  args, weights = llama2c.load(STORIES)
  meta.save(tmp_path, args, {k: np.asarray(v) for k, v in weights.items()})
  check_all(tmp_path / "consolidated.00.pth", (tmp_path / "consolidated.00.pth").read_bytes(), seed=4)
