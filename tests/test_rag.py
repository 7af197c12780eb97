"""Retrieval QA: the splitter's chunks, retrieval of facts planted in real text (recall of dense, BM25 and fused
rankings), prompts that carry the retrieved chunks, `tinyllama2 rag index / ask`, index files that survive a killed
build and refuse to load when damaged, embeddings through an OpenAI-compatible endpoint, and the LangChain example
against a real server."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, need
from planted_facts import plant, recall

pytest.importorskip("bm25s", reason="retrieval needs the rag extra: pip install -e '.[rag]'")
pytest.importorskip("jieba", reason="retrieval needs the rag extra: pip install -e '.[rag]'")

from tinyllama2 import DEFAULT_MODEL, Llama, rag  # noqa: E402
from tinyllama2.rag import store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = SHARED / "corpora" / "tinyshakespeare_input.txt"
HONGLOUMENG = SHARED / "corpora" / "hongloumeng_zh.txt"
FACT = "The lighthouse keeper Zorvath Quell owns exactly 47 brass telescopes."
QUESTION = "How many brass telescopes does Zorvath Quell own?"


@pytest.fixture(scope="module")
def llm():
  from tinyllama2.tokenizer import PlainTemplate
  llm = Llama.from_pretrained(DEFAULT_MODEL)
  llm.chat_template = PlainTemplate()   # a base model, as `rag ask` and the server pick for it
  return llm


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
  """Two English files of Shakespeare, one holding FACT, and a Chinese one."""
  need(SHAKESPEARE, HONGLOUMENG)
  d = tmp_path_factory.mktemp("docs")
  text = SHAKESPEARE.read_text(encoding="utf-8")
  (d / "a.txt").write_text(text[:3000], encoding="utf-8")
  (d / "b.md").write_text(text[3000:4500] + "\n" + FACT + "\n" + text[4500:6000], encoding="utf-8")
  (d / "notes.pdf").write_bytes(b"%PDF- not indexed")
  return d


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tinyllama2.cli", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


# ---- splitting ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("corpus", ["shakespeare", "hongloumeng"])
def test_chunks_cover_the_text_within_size_and_overlap(corpus):
  path = SHAKESPEARE if corpus == "shakespeare" else HONGLOUMENG
  need(path)
  text = path.read_text(encoding="utf-8")[:60000]
  chunks = rag.split_text(text, 600, 100)
  covered = np.zeros(len(text), bool)
  for start, body in chunks:
    assert text[start:start + len(body)] == body and 0 < len(body) <= 600
    covered[start:start + len(body)] = True
  assert all(text[i].isspace() for i in np.flatnonzero(~covered))   # nothing but whitespace left out
  overlaps = [s0 + len(b0) - s1 for (s0, b0), (s1, _) in zip(chunks, chunks[1:])]
  assert min(overlaps) >= 0 and max(overlaps) <= 100
  if corpus == "hongloumeng":   # Chinese: chunks end at sentence ends or lines, not in the middle of a sentence
    ends = [b.rstrip("”’」』 \u3000")[-1:] for _, b in chunks[:-1]]
    assert np.mean([e in "。！？" or b.endswith("\n") for e, (_, b) in zip(ends, chunks)]) > 0.95
  else: assert np.mean([b[-1] in "\n.!?;, " for _, b in chunks[:-1]]) > 0.95


def test_split_edge_cases():
  assert rag.split_text("", 10, 2) == [] and rag.split_text("  \n\n ", 10, 2) == []
  assert rag.split_text("x" * 25, 10, 0) == [(0, "x" * 10), (10, "x" * 10), (20, "x" * 5)]   # no boundary: cut
  with pytest.raises(ValueError, match="chunk_overlap"): rag.split_text("abc", 10, 10)
  with pytest.raises(ValueError, match="chunk_size"): rag.split_text("abc", 0, 0)


# ---- retrieval quality on planted facts ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("corpus,lang", [("shakespeare", "en"), ("hongloumeng", "zh")])
def test_planted_facts_are_retrieved(corpus, lang, llm, tmp_path):
  """20 invented facts planted at random lines of 40k characters of a real corpus, each asked for: the fused
  ranking finds >= 90% in its top 5 (BM25 alone too; the bundled 1.2M-parameter model's dense embeddings are weak)."""
  path = SHAKESPEARE if corpus == "shakespeare" else HONGLOUMENG
  need(path)
  text, facts = plant(path.read_text(encoding="utf-8")[:40000], 20, lang, seed=3)
  (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
  index = rag.index_documents([tmp_path], llm, model_path=str(DEFAULT_MODEL))
  vectors = rag.query_embedder(index, llm).embed([f.question for f in facts])
  table = {}
  for mode in rag.MODES:
    ranked = [[h.chunk.text for h in rag.search(index, f.question, v, 5, mode)] for f, v in zip(facts, vectors)]
    table[mode] = (recall(ranked, facts, 1), recall(ranked, facts, 5))
  print(f"{corpus}: {len(index.chunks)} chunks; recall@1, @5:", table)
  assert table["fused"][1] >= 0.9 and table["bm25"][1] >= 0.9
  # the prompt carries the retrieved chunks, best first, whole when they fit
  hits = rag.search(index, facts[0].question, vectors[0], 4)
  prompt = rag.build_prompt(llm, facts[0].question, hits, budget=100_000)
  at = [prompt.text.index(h.chunk.text.strip()) for h in hits]
  assert at == sorted(at) and facts[0].question in prompt.text and not prompt.cut
  assert prompt.ids == llm.tokenizer.encode(prompt.text, bos=True)   # a base model: the text alone, no system message


def test_prompt_fits_the_budget(llm):
  chunk = lambda i, text: rag.Hit(rag.Chunk("doc.txt", i, 0, text), 1.0)
  hits = [chunk(0, FACT + " " + "The sea was calm that night. " * 4), chunk(1, "Another chunk of text. " * 6)]
  whole = rag.build_prompt(llm, QUESTION, hits, budget=10_000)
  n0 = len(rag.build_prompt(llm, QUESTION, hits[:1], budget=10_000).ids)
  one = rag.build_prompt(llm, QUESTION, hits, budget=n0)   # room for the first chunk only
  assert [h.chunk.index for h in whole.hits] == [0, 1] and [h.chunk.index for h in one.hits] == [0]
  cut = rag.build_prompt(llm, QUESTION, hits, budget=n0 - 10)   # not even that: the first chunk is cut
  assert cut.cut and len(cut.ids) <= n0 - 10 and "The lighthouse keeper" in cut.text
  with pytest.raises(ValueError, match="over the 5 the context leaves"): rag.build_prompt(llm, QUESTION, hits, budget=5)


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_index_and_ask(docs, tmp_path):
  out = tmp_path / "idx"
  r = cli("rag", "index", str(docs), "--out", str(out), "--chunk-size", "200", "--chunk-overlap", "40")
  assert r.returncode == 0, r.stderr
  assert re.search(r"indexed \d+ chunks of 2 files", r.stderr)   # the .pdf is not read
  r = cli("rag", "ask", "--index", str(out), QUESTION, "--json", "--temperature", "0", "--max-new-tokens", "24")
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout)
  fact_ids = {c.id for c in rag.load(out).chunks if FACT in c.text}
  first = got["sources"][0]
  assert first["id"] in fact_ids and first["ranks"].get("bm25") == 1   # BM25's best, and so the first in the prompt
  assert FACT in got["prompts"][0] and got["answer"].strip()
  r = cli("rag", "ask", "--index", str(out), QUESTION, "--temperature", "0", "--max-new-tokens", "8", "--k", "2",
          "--chain", "refine")
  assert r.returncode == 0, r.stderr
  assert "Sources:" in r.stdout and f"{docs / 'b.md'}#" in r.stdout
  # nothing the user had is overwritten: an index only with --force, another folder never
  r = cli("rag", "index", str(docs), "--out", str(out))
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"error: {out} already holds an index; pass --force to replace it"
  r = cli("rag", "index", str(docs), "--out", str(docs), "--force")
  assert r.returncode == 1 and "is a folder that is not an index" in r.stderr


# ---- index files ---------------------------------------------------------------------------------------------------
def small_index(llm, docs: Path, out: Path, **kw) -> rag.Index:
  return rag.index_documents([docs / "b.md"], llm, model_path=str(DEFAULT_MODEL), out=out, chunk_size=300,
                             chunk_overlap=50, **kw)


@pytest.mark.slow
def test_killed_build_leaves_the_old_index(llm, docs, tmp_path, monkeypatch):
  out = tmp_path / "idx"
  old = small_index(llm, docs, out)
  big = tmp_path / "big.txt"
  big.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
  proc = subprocess.Popen([sys.executable, "-m", "tinyllama2.cli", "rag", "index", str(big), "--out", str(out),
                           "--force", "--chunk-size", "300", "--chunk-overlap", "50"], cwd=REPO,
                          stderr=subprocess.PIPE, text=True)
  seen = ""
  while "embedding chunks" not in seen and proc.poll() is None: seen += proc.stderr.read(1)
  time.sleep(3)   # well into embedding
  assert proc.poll() is None, "the build ended before it could be killed"
  proc.kill()
  proc.wait()
  def same_as_old():
    now = rag.load(out)
    assert [c.text for c in now.chunks] == [c.text for c in old.chunks]
    np.testing.assert_array_equal(now.vectors, old.vectors)
  same_as_old()
  for stage in ("rename", "replace"):   # killed while the new version is written, or just before the switch
    def die(*_a, **_k): raise KeyboardInterrupt
    with monkeypatch.context() as m:
      m.setattr(store.os, stage, die)
      with pytest.raises(KeyboardInterrupt): small_index(llm, docs, out, force=True)
    same_as_old()
  small_index(llm, docs, out, force=True)   # a good build replaces it and tidies what the others left
  assert sorted(p.name for p in out.iterdir() if not p.name.startswith("v1-")) == ["index.json"]
  assert len([p for p in out.iterdir() if p.name.startswith("v1-")]) == 2   # the new one and the one it replaced
  first = tmp_path / "first"   # a first build killed before its switch leaves no index, and blocks no later build
  with monkeypatch.context() as m:
    m.setattr(store.os, "replace", lambda *_a, **_k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt): small_index(llm, docs, first)
  with pytest.raises(ValueError, match="no index.json"): rag.load(first)
  assert len(small_index(llm, docs, first).chunks) == len(old.chunks) and len(rag.load(first).chunks) == len(old.chunks)


def test_damaged_index_errors(llm, docs, tmp_path):
  out = tmp_path / "idx"
  small_index(llm, docs, out)
  version = out / json.loads((out / "index.json").read_text())["current"]
  with pytest.raises(ValueError, match="does not exist; build one with `tinyllama2 rag index"): rag.load(tmp_path / "none")
  with pytest.raises(ValueError, match=r"is not a tinyllama2 rag index \(no index.json\)"): rag.load(docs)
  def damaged(match: str, path: Path, data: bytes) -> None:
    saved = path.read_bytes()
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match): rag.load(out)
    path.write_bytes(saved)
  damaged("malformed index .index.json", out / "index.json", b"{not json")
  damaged("format version 99", out / "index.json", json.dumps({"format": store.FORMAT, "version": 99}).encode())
  damaged("malformed index .*vectors.npy", version / "vectors.npy", (version / "vectors.npy").read_bytes()[:100])
  damaged("malformed index .*for \\d+ chunks", version / "chunks.jsonl",
          (version / "chunks.jsonl").read_bytes().split(b"\n", 1)[1])
  damaged("malformed index", version / "chunks.jsonl", b'{"source": 1}\n')
  rag.load(out)   # restored: loads again
  r = cli("rag", "ask", "--index", str(docs), QUESTION)
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no index.json" in r.stderr
  with pytest.raises(ValueError, match="only .txt and .md"): rag.document_paths([docs / "notes.pdf"])
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(ValueError, match="not UTF-8"): rag.index_documents([tmp_path / "latin1.txt"], llm, model_path="m")


# ---- an OpenAI-compatible embeddings endpoint ------------------------------------------------------------------------
def test_endpoint_embeddings_equal_the_models(bundled_server, llm, docs, tmp_path):
  texts = [FACT, "Lily went to the park.", (docs / "a.txt").read_text(encoding="utf-8")[:300]]
  remote = rag.EndpointEmbedder(bundled_server.url + "/v1", "bundled", batch=2).embed(texts)
  np.testing.assert_allclose(remote, rag.ModelEmbedder(llm, "m").embed(texts), atol=1e-5)
  out = tmp_path / "idx"
  r = cli("rag", "index", str(docs / "b.md"), "--out", str(out), "--chunk-size", "300", "--chunk-overlap", "50",
          "--embeddings-url", bundled_server.url + "/v1", "--embeddings-model", "bundled")
  assert r.returncode == 0, r.stderr
  index = rag.load(out)
  assert index.meta["embedder"] == {"kind": "endpoint", "url": bundled_server.url + "/v1", "model": "bundled"}
  hits = rag.search(index, QUESTION, rag.query_embedder(index).embed([QUESTION])[0], 2)
  assert any(FACT in h.chunk.text for h in hits)
  with pytest.raises(ValueError, match=r"^embeddings endpoint http://127.0.0.1:9/v1 cannot be reached"):
    rag.EndpointEmbedder("http://127.0.0.1:9/v1").embed(["x"])
  with pytest.raises(ValueError, match="HTTP 400: an input has \\d+ tokens, over this model's context"):
    rag.EndpointEmbedder(bundled_server.url + "/v1", "bundled").embed(["word " * 400])


def test_langchain_example_against_the_server(bundled_server, llm, docs):
  """examples/rag_langchain.py through langchain-openai: its sources are the chunks whose embeddings (computed
  here by the library, compared by numpy) are most similar to the question's."""
  pytest.importorskip("langchain_openai", reason="the LangChain example needs the rag extra: pip install -e '.[rag]'")
  folder = docs.parent / "docs_en"
  folder.mkdir(exist_ok=True)
  for name in ("a.txt", "b.md"): (folder / name).write_text((docs / name).read_text(encoding="utf-8"), encoding="utf-8")
  r = subprocess.run([sys.executable, str(REPO / "examples" / "rag_langchain.py"), "--base-url",
                      bundled_server.url + "/v1", "--model", "bundled", "--k", "2", str(folder), QUESTION],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  answer, _, sources = r.stdout.rpartition("\nSources:\n")
  got = [line.strip() for line in sources.splitlines() if line.strip()]
  chunks = [c for f in rag.document_paths([folder]) for c in rag.chunk_document(str(f), f.read_text(encoding="utf-8"), 120, 20)]
  vectors = llm.embed([c.text for c in chunks])
  q = llm.embed([QUESTION])[0]
  assert got == [chunks[i].id for i in np.argsort(-(vectors @ q))[:2]]
  assert answer.strip()


def test_embeddings_while_every_slot_generates():
  """Llama.embed with a free slot (a prefill through its cache) and with none (a cache-free pass between decode
  steps) gives the same vectors, and does not wait for the generation."""
  one = Llama.from_pretrained(DEFAULT_MODEL, slots=1)
  texts = [FACT, "Lily went to the park."]
  alone = one.embed(texts)
  stream = iter(one.generate("Once upon a time", max_new_tokens=200, stream=True, do_sample=False))
  next(stream)
  assert one.engine.occupancy()[0] == 1   # the only slot is busy
  busy = one.embed(texts)
  assert one.engine.occupancy()[0] == 1 and len("".join(stream)) > 0   # it did not wait for the generation to end
  np.testing.assert_allclose(busy, alone, atol=1e-5)


def test_hidden_states_of_several_prefill_chunks_equal_the_cache_free_pass():
  from tinyllama2.decoder import Decoder
  model = Llama.from_pretrained(DEFAULT_MODEL).model
  decoder = Decoder(model, slots=2, prefill_chunk=64)
  ids = [1] + np.random.default_rng(0).integers(3, model.args.vocab_size, 200).tolist()
  np.testing.assert_allclose(decoder.hidden_states(ids, 1), decoder.hidden_states(ids, None), atol=1e-4)
  assert decoder.held[1] == ids and decoder.held[0] == []
