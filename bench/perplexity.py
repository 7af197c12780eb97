"""Perplexity of a model on held-out text, float vs quantized, e.g.

  python bench/perplexity.py --model ../shared/models/stories260K.bin --tokenizer ../shared/tokenizers/tok512.model \\
      --text ../shared/corpora/tinystories_train_first2MiB.txt --quantize int8 --quantize int4
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from tinyllama2 import Llama
from tinyllama2.cli import run_cli


def nll_per_token(llm: Llama, ids: list[int], window: int) -> float:
  """Mean negative log-likelihood (nats) of each token given the previous ones, over non-overlapping windows."""
  total, count = 0.0, 0
  for start in range(0, len(ids) - 1, window):
    chunk = ids[start:start + window + 1]
    if len(chunk) < 2: break
    logits = llm.logits(chunk[:-1]).astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    total += float((logz - logits[np.arange(len(chunk) - 1), chunk[1:]]).sum())
    count += len(chunk) - 1
  return total / count


def main(a: argparse.Namespace) -> None:
  text = Path(a.text).read_text(encoding="utf-8")
  held_out = text[-a.chars:]   # the end of the file: not what a model trained on its start has seen
  rows = []
  for q in [None] + [q for q in a.quantize or []]:
    llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, quantize=q, device=a.device)
    ids = llm.tokenizer.encode(held_out, bos=True)[: a.tokens + 1]
    nll = nll_per_token(llm, ids, min(a.window, llm.model.max_seq_len - 1))
    rows.append((q or "float", nll))
  print("weights | nll (nats/token) | perplexity | change")
  print("--- | --- | --- | ---")
  for name, nll in rows:
    print(f"{name} | {nll:.4f} | {np.exp(nll):.3f} | {np.exp(nll) / np.exp(rows[0][1]) - 1:+.2%}")


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="model path")
  p.add_argument("--tokenizer", help="tokenizer.model")
  p.add_argument("--text", required=True, help="a UTF-8 text file; its last --chars characters are used")
  p.add_argument("--chars", type=int, default=20000, help="characters of held-out text from the end of the file")
  p.add_argument("--tokens", type=int, default=2048, help="tokens to score at most")
  p.add_argument("--window", type=int, default=256, help="context window per forward pass")
  p.add_argument("--quantize", action="append", choices=["int8", "int4"], help="quantized variants to compare")
  p.add_argument("--device", help="tinygrad device")
  sys.exit(run_cli(main, p.parse_args()))
