"""`tinyllama2 rag index`: split documents into chunks and index them; `tinyllama2 rag ask`: answer a question from
the chunks that match it, citing them."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_args, add_sampling_args, int_flag, load_model, sampling_kwargs

HELP = "retrieval QA over your documents (rag index DOCS --out INDEX; rag ask --index INDEX QUESTION)"


def add_args(p: argparse.ArgumentParser) -> None:
  sub = p.add_subparsers(dest="action", required=True)
  idx = sub.add_parser("index", help="split, embed and index .txt/.md documents (files or folders)")
  idx.add_argument("docs", nargs="+", help="files or folders (their .txt and .md files, recursively)")
  idx.add_argument("--out", required=True, help="the index folder (replaced only with --force)")
  idx.add_argument("--force", action="store_true", help="replace an existing index at --out")
  idx.add_argument("--chunk-size", type=int_flag(1), default=600, help="characters a chunk holds at most (600)")
  idx.add_argument("--chunk-overlap", type=int_flag(0), default=100, help="characters consecutive chunks share (100)")
  idx.add_argument("--embeddings-url", help="embed with this OpenAI-compatible endpoint (its base URL, e.g. "
                                            "http://localhost:8000/v1) instead of the model's own embeddings")
  idx.add_argument("--embeddings-model", default="default", help="the endpoint's model name (with --embeddings-url)")
  add_model_args(idx, required=False)
  ask = sub.add_parser("ask", help="answer a question from an index, citing the chunks it used")
  ask.add_argument("question", help="the question")
  ask.add_argument("--index", required=True, help="an index built by `tinyllama2 rag index`")
  ask.add_argument("--k", type=int_flag(1), default=4, help="chunks retrieved (4)")
  ask.add_argument("--retriever", choices=["fused", "dense", "bm25"], default="fused",
                   help="cosine similarity and BM25 fused by reciprocal rank (default), or either alone")
  ask.add_argument("--chain", choices=["stuff", "refine"], default="stuff",
                   help="stuff: all chunks in one prompt; refine: an answer improved chunk by chunk")
  ask.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto",
                   help="chat format: llama2 [INST] format, plain continuation, or auto (by model name)")
  ask.add_argument("--embed-model", help="the model that embedded the index, when it is not where the index says")
  ask.add_argument("--show-prompt", action="store_true", help="print the prompt(s) before the answer")
  ask.add_argument("--json", action="store_true",
                   help="print {answer, sources: [{id, source, chunk, start, score, ranks}], prompts}")
  add_model_args(ask, required=False)
  add_sampling_args(ask)
  ask.set_defaults(max_new_tokens=64)   # the bundled model's context is 256 tokens: most of it is for the chunks


def _default_model(a: argparse.Namespace) -> None:
  from .. import DEFAULT_MODEL
  a.model = a.model or str(DEFAULT_MODEL)


EMBEDDING_OPTIONS = ("tokenizer", "dtype", "adapter", "quantize", "max_seq_len")   # flags that change the vectors


def _model_name(model: str) -> str:
  """A path as an absolute path (the index may be used from another folder), a Hugging Face repo id as it is."""
  return str(Path(model).resolve()) if Path(model).exists() else model


def _embedding_options(a: argparse.Namespace) -> dict:
  return {k: getattr(a, k) for k in EMBEDDING_OPTIONS if getattr(a, k, None) is not None}


def main(a: argparse.Namespace) -> None:
  return index(a) if a.action == "index" else ask(a)


def index(a: argparse.Namespace) -> None:
  from .. import rag
  rag.store.check_writable(Path(a.out), a.force)   # before loading the model and embedding
  if a.chunk_overlap >= a.chunk_size:
    raise ValueError(f"--chunk-overlap ({a.chunk_overlap}) must be less than --chunk-size ({a.chunk_size})")
  if a.embeddings_url: embedder = rag.EndpointEmbedder(a.embeddings_url, a.embeddings_model)
  else:
    _default_model(a)
    embedder = rag.ModelEmbedder(load_model(a), _model_name(a.model), _embedding_options(a))
  built = rag.index_documents(a.docs, embedder=embedder, out=a.out, chunk_size=a.chunk_size,
                              chunk_overlap=a.chunk_overlap, force=a.force, progress=True)
  print(f"indexed {len(built.chunks)} chunks of {len(built.meta['sources'])} files into {a.out}", file=sys.stderr)


def _query_embedder(a: argparse.Namespace, index, llm):
  """The index's own embedder: its endpoint, the model answering if that is the one that embedded it, else that
  model loaded beside it."""
  from .. import rag
  from ..llama import Llama
  how = index.meta.get("embedder", {})
  if how.get("kind") == "endpoint": return rag.query_embedder(index)
  path, options = a.embed_model or str(how.get("model")), how.get("options") or {}
  if a.embed_model is None and _model_name(a.model) == path and _embedding_options(a) == options:
    return rag.query_embedder(index, llm)
  try: embedding_model = Llama.from_pretrained(path, device=a.device, **options)
  except (OSError, ValueError) as e:
    raise ValueError(f"the index was embedded by {path} ({e}); pass that model as --embed-model") from None
  return rag.query_embedder(index, embedding_model)


def ask(a: argparse.Namespace) -> None:
  from .. import rag
  from .chat import is_chat_model
  from ..tokenizer import Llama2ChatTemplate, PlainTemplate
  index = rag.load(a.index)
  _default_model(a)
  llm = load_model(a)
  use_chat = a.template == "llama2" or (a.template == "auto" and is_chat_model(a.model))
  llm.chat_template = Llama2ChatTemplate() if use_chat else PlainTemplate()
  vector = None if a.retriever == "bm25" else _query_embedder(a, index, llm).embed([a.question])[0]
  hits = rag.search(index, a.question, vector, a.k, a.retriever)
  result = rag.answer(llm, a.question, hits, a.chain, **sampling_kwargs(a))
  if len(result.sources) < len(hits) or any(p.cut for p in result.prompts):
    print(f"warning: the model's context ({llm.model.max_seq_len} tokens) holds {len(result.sources)} of the {len(hits)} "
          "chunks retrieved" + (", the first cut short" if any(p.cut for p in result.prompts) else "")
          + "; a smaller --chunk-size or a larger --max-seq-len fits more", file=sys.stderr)
  if a.json:
    print(json.dumps({"answer": result.text, "sources": [_source(h) for h in result.sources],
                      "prompts": [p.text for p in result.prompts]}, ensure_ascii=False))
    return
  if a.show_prompt:
    for p in result.prompts: print(f"--- prompt ---\n{p.text}\n--------------")
  print(result.text)
  print("\nSources:")
  for h in result.sources: print(f"  {h.chunk.id}  (score {h.score:.4f})")


def _source(hit) -> dict:
  return {"id": hit.chunk.id, "source": hit.chunk.source, "chunk": hit.chunk.index, "start": hit.chunk.start,
          "score": hit.score, "ranks": hit.ranks}
