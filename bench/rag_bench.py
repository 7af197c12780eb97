"""Retrieval at scale: chunks/s embedded (beside the same model's plain prefill, in the same run), query latency
and recall@1/@5 of dense, BM25 and fused retrieval for 20 facts planted in a 10k-chunk index of real text.

  python bench/rag_bench.py [--chunks 10000] [--chunk-size 300] [--model PATH]
Corpora from ../shared (TinyStories sample, tinyshakespeare); the facts are planted in the Shakespeare part.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted_facts import plant, recall  # noqa: E402

from tinyllama2 import DEFAULT_MODEL, Llama, rag  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def prefill_tokens_per_s(llm, length: int, repeats: int = 20) -> float:
  """The model's own prefill of `length`-token prompts (nothing reused), the reference for embedding speed."""
  ids = [llm.tokenizer.bos_id] + list(np.random.default_rng(0).integers(3, llm.args.vocab_size, length - 1))
  for _ in range(3): llm.decoder.forget(); llm.decoder.prefill(ids)
  t = time.perf_counter()
  for _ in range(repeats): llm.decoder.forget(); llm.decoder.prefill(ids)
  return repeats * length / (time.perf_counter() - t)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chunks", type=int, default=10_000)
  p.add_argument("--chunk-size", type=int, default=300)
  p.add_argument("--model", default=str(DEFAULT_MODEL))
  a = p.parse_args()
  llm = Llama.from_pretrained(a.model)
  shakespeare, facts = plant((SHARED / "tinyshakespeare_input.txt").read_text(encoding="utf-8"), 20, "en", seed=7)
  overlap = a.chunk_size // 6
  chunks = rag.chunk_document("tinyshakespeare", shakespeare, a.chunk_size, overlap)
  stories = (SHARED / "tinystories_train_first2MiB.txt").read_text(encoding="utf-8", errors="ignore")
  chunks += rag.chunk_document("tinystories", stories, a.chunk_size, overlap)[:max(a.chunks - len(chunks), 0)]
  chunks = chunks[:a.chunks]
  embedder = rag.ModelEmbedder(llm, a.model)
  embedder.embed([c.text for c in chunks[:64]])   # compiles the graphs of every padded length once
  t = time.perf_counter()
  vectors = embedder.embed([c.text for c in chunks])
  embed_s = time.perf_counter() - t
  tokens = sum(len(llm.tokenizer.encode(c.text, bos=True)) for c in chunks)
  t = time.perf_counter()
  bm25 = rag.lexical.BM25.build([c.text for c in chunks])
  bm25_s = time.perf_counter() - t
  reference = prefill_tokens_per_s(llm, 128)
  index = rag.Index(chunks, vectors, bm25, {})
  print(f"{len(chunks)} chunks of <= {a.chunk_size} characters, {tokens / len(chunks):.0f} tokens each on average")
  print(f"embedding: {len(chunks) / embed_s:.1f} chunks/s = {tokens / embed_s:.0f} tokens/s; the model's 128-token "
        f"prefill {reference:.0f} tokens/s in this run ({tokens / embed_s / reference:.2f}x); BM25 index {bm25_s:.1f} s")
  for mode in rag.MODES:
    ranked, times = [], []
    for f in facts:
      t = time.perf_counter()
      v = None if mode == "bm25" else embedder.embed([f.question])[0]
      hits = rag.search(index, f.question, v, 5, mode)
      times.append(time.perf_counter() - t)
      ranked.append([h.chunk.text for h in hits])
    print(f"{mode:>5}: recall@1 {recall(ranked, facts, 1):.2f}, recall@5 {recall(ranked, facts, 5):.2f}; query "
          f"(embedding the question + search) median {1000 * np.median(times):.1f} ms, max {1000 * max(times):.1f} ms")


if __name__ == "__main__":
  main()
