"""The write-up's LangChain route against `tinyllama2 serve`: OpenAI-compatible embeddings and chat from our
server, LangChain's in-memory vector store and a retrieval chain. Needs the rag extra (langchain-openai).

  tinyllama2 serve --port 8000 &
  python examples/rag_langchain.py --base-url http://localhost:8000/v1 DOCS_FOLDER "Who keeps 47 telescopes?"
"""
import argparse
import sys

from tinyllama2.rag import chunk_document, document_paths
from tinyllama2.rag.build import read_text

PROMPT = "Use the context to answer the question.\n\nContext:\n{context}\n\nQuestion: {question}"


def retrieval_chain(base_url: str, model: str, docs: list[str], k: int, chunk_size: int):
  """A chain from a question to {"context": the k chunks most similar to it, "question", "answer"}: chunks
  embedded by the server into an InMemoryVectorStore, the best put with the question into a prompt for the
  server's chat model."""
  from langchain_core.documents import Document
  from langchain_core.output_parsers import StrOutputParser
  from langchain_core.prompts import ChatPromptTemplate
  from langchain_core.runnables import RunnableParallel, RunnablePassthrough
  from langchain_core.vectorstores import InMemoryVectorStore
  from langchain_openai import ChatOpenAI, OpenAIEmbeddings

  chunks = [c for f in document_paths(docs) for c in chunk_document(str(f), read_text(f), chunk_size, chunk_size // 6)]
  # check_embedding_ctx_length=False: send the texts themselves (no tiktoken download to count tokens)
  embeddings = OpenAIEmbeddings(base_url=base_url, api_key="unused", model=model, check_embedding_ctx_length=False)
  store = InMemoryVectorStore.from_documents(
    [Document(c.text, metadata={"id": c.id, "source": c.source}) for c in chunks], embeddings)
  llm = ChatOpenAI(base_url=base_url, api_key="unused", model=model, temperature=0, max_tokens=48)
  answer = (lambda x: {"context": "\n\n".join(d.page_content for d in x["context"]), "question": x["question"]}) \
    | ChatPromptTemplate.from_template(PROMPT) | llm | StrOutputParser()
  retrieve = RunnableParallel(context=store.as_retriever(search_kwargs={"k": k}), question=RunnablePassthrough())
  return retrieve.assign(answer=answer)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("docs", nargs="+", help="files or folders of .txt/.md")
  p.add_argument("question")
  p.add_argument("--base-url", default="http://localhost:8000/v1", help="the server's OpenAI base URL")
  p.add_argument("--model", default="default", help="the served model's name")
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--chunk-size", type=int, default=120, help="characters a chunk holds (two and the answer fit the bundled model)")
  a = p.parse_args()
  try: import langchain_openai  # noqa: F401
  except ImportError:
    print("error: this example needs langchain-openai: pip install 'tinyllama2[rag]'", file=sys.stderr)
    return 1
  import openai
  try:
    result = retrieval_chain(a.base_url, a.model, a.docs, a.k, a.chunk_size).invoke(a.question)
  except (openai.APIError, ValueError, OSError) as e:   # the server's one-line error, e.g. a chunk over its context
    print(f"error: {getattr(e, 'message', None) or e}", file=sys.stderr)
    return 1
  print(result["answer"])
  print("\nSources:")
  for d in result["context"]: print(f"  {d.metadata['id']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
