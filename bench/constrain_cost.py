"""Cost per token of constrained decoding (serve/constrain.py, llguidance) at Llama-2's vocabulary of 32000: the
median time of mask + advance over 200 tokens, for json_object and a schema, driven by random logits (biased
towards quotes and closing brackets so that strings end). A benchmark, not a test.

  python bench/constrain_cost.py [--tokenizer ../shared/tokenizers/llama2_tokenizer.model]
"""
import argparse
import time
from pathlib import Path

import numpy as np

from tinyllama2.serve.constrain import Constraint, json_grammar, token_bytes
from tinyllama2.tokenizer import Tokenizer

SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}


def cost(tok: Tokenizer, grammar: str, tokens: int = 200) -> tuple[float, float]:
  """(median ms of mask + advance per token, median ms to make a Constraint)."""
  closers = np.array([any(c in t for c in b'"}]') for t in token_bytes(tok.sp)], dtype=np.float32)
  rng, times, builds = np.random.default_rng(0), [], []
  while len(times) < tokens:
    t0 = time.perf_counter()
    c = Constraint(tok, grammar)
    builds.append(time.perf_counter() - t0)
    for n in range(10_000):
      if c.done() or len(times) >= tokens: break
      logits = rng.standard_normal(tok.vocab_size).astype(np.float32) + closers * 0.03 * n
      t0 = time.perf_counter()
      token = int(np.argmax(c.mask(logits)))
      if token == tok.eos_id: break
      c.advance(token)
      times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3, float(np.median(builds)) * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "tokenizers" /
                                            "llama2_tokenizer.model"))
  tok = Tokenizer(p.parse_args().tokenizer)
  for name, rf in [("json_object", {"type": "json_object"}),
                   ("schema", {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})]:
    per_token, build = cost(tok, json_grammar(rf))
    print(f"{name}: mask + advance {per_token:.3f} ms/token (median of 200), Constraint() {build:.2f} ms, "
          f"vocabulary {tok.vocab_size}")


if __name__ == "__main__":
  main()
