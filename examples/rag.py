"""Answer a question about a folder of .txt/.md files with the bundled model (or --model), citing the chunks used.

  python examples/rag.py DOCS_FOLDER "How many brass telescopes does Zorvath Quell keep?"
The index is kept in DOCS_FOLDER.index (rebuilt with --rebuild); `tinyllama2 rag index/ask` does the same with
more options.
"""
import argparse
from pathlib import Path

from tinyllama2 import DEFAULT_MODEL, Llama, rag


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("docs", help="a folder of .txt/.md files")
  p.add_argument("question")
  p.add_argument("--model", default=str(DEFAULT_MODEL))
  p.add_argument("--chunk-size", type=int, default=200, help="characters a chunk holds (the bundled model reads 256 tokens)")
  p.add_argument("--rebuild", action="store_true", help="index the folder again")
  a = p.parse_args()
  llm = Llama.from_pretrained(a.model)
  where = Path(a.docs.rstrip("/") + ".index")
  if a.rebuild or not where.exists():
    rag.index_documents([a.docs], llm, model_path=a.model, out=where, chunk_size=a.chunk_size,
                        chunk_overlap=a.chunk_size // 6, force=a.rebuild, progress=True)
  answer = rag.ask(llm, where, a.question, k=3, max_new_tokens=48, do_sample=False)
  print(answer.text, "\n\nSources:", *[f"  {h.chunk.id}" for h in answer.sources], sep="\n")


if __name__ == "__main__":
  main()
