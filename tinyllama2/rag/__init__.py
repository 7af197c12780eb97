"""Retrieval question answering over the user's own documents: split them into chunks, embed the chunks, find
those that match a question (dense, BM25, or both fused) and answer from them with the model.

    from tinyllama2 import Llama, rag
    llm = Llama.from_pretrained(path)
    index = rag.index_documents(["docs/"], llm, model_path=path, out="docs.index")
    answer = rag.ask(llm, index, "Who keeps the lighthouse?")
    print(answer.text, [h.chunk.id for h in answer.sources])

BM25 needs the `rag` extra (bm25s, jieba)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .build import build_index, document_paths
from .embedders import Embedder, EndpointEmbedder, ModelEmbedder
from .qa import CHAINS, Answer, Prompt, answer, build_prompt
from .retrieve import MODES, Hit, search
from .split import Chunk, chunk_document, split_text
from .store import Index, check_writable, load, save

if TYPE_CHECKING: from ..llama import Llama

__all__ = ["Answer", "CHAINS", "Chunk", "Embedder", "EndpointEmbedder", "Hit", "Index", "MODES", "ModelEmbedder",
           "Prompt", "answer", "ask", "build_index", "build_prompt", "chunk_document", "document_paths",
           "index_documents", "load", "query_embedder", "save", "search", "split_text"]


def index_documents(paths: Sequence[str | Path], llm: Llama | None = None, model_path: str | None = None,
                    out: str | Path | None = None, embedder: Embedder | None = None, chunk_size: int = 600,
                    chunk_overlap: int = 100, force: bool = False, progress: bool = False) -> Index:
  """An index of the documents' chunks embedded by `embedder` (default: llm's own embeddings, recorded as
  `model_path`, the path or name it was loaded from), saved to `out` when given (an existing index only with
  force)."""
  if embedder is None:
    if llm is None or model_path is None:
      raise ValueError("index_documents needs llm= and model_path= (the model's embeddings), or embedder=")
    embedder = ModelEmbedder(llm, str(model_path))
  if out is not None: check_writable(Path(out), force)   # before the work, not after it
  index = build_index(paths, embedder, chunk_size, chunk_overlap, progress=progress)
  if out is not None: save(index, out, force=force)
  return index


def query_embedder(index: Index, llm: Llama | None = None) -> Embedder:
  """The embedder of the index's chunks, for its questions: the endpoint it recorded, or the model (`llm`, which
  must be the model the index was built with)."""
  how = index.meta.get("embedder", {})
  if how.get("kind") == "endpoint": return EndpointEmbedder(how["url"], how.get("model", "default"))
  if llm is None: raise ValueError(f"this index was embedded by the model {how.get('model')}: pass that model")
  if llm.args.dim != index.vectors.shape[1]:
    raise ValueError(f"this index was embedded by {how.get('model')} ({index.vectors.shape[1]} dimensions); the model "
                     f"given has {llm.args.dim}: pass the model the index was built with")
  return ModelEmbedder(llm, str(how.get("model")), how.get("options"))


def ask(llm: Llama, index: Index | str | Path, question: str, k: int = 4, mode: str = "fused", chain: str = "stuff",
        embedder: Embedder | None = None, **generation) -> Answer:
  """Retrieve the k best chunks for `question` and answer it with `llm` from them (generation: GenerationConfig
  settings such as max_new_tokens, temperature)."""
  if not isinstance(index, Index): index = load(index)
  vector = None
  if mode != "bm25": vector = (embedder or query_embedder(index, llm)).embed([question])[0]
  return answer(llm, question, search(index, question, vector, k, mode), chain, **generation)
