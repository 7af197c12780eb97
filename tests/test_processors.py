"""Logits processors against formulas written here in numpy; beam search against exhaustive search; batches;
seeded sampling across processes and backends; streaming of Chinese and emoji."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference_numpy
from conftest import LLAMA_TOK, STORIES, TOK512, need
from tinyllama2 import Llama, ModelArgs, Tokenizer, Transformer
from tinyllama2.generate import TextStream, TokenStep
from tinyllama2.sampling import SamplingParams, process

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 2, 40).astype(np.float32)


def test_repetition_penalty_formula():
  seen = [3, 3, 7, 11]
  out = process(LOGITS, SamplingParams(repetition_penalty=1.5), seen)
  want = LOGITS.copy()
  for t in {3, 7, 11}: want[t] = LOGITS[t] * 1.5 if LOGITS[t] < 0 else LOGITS[t] / 1.5
  np.testing.assert_allclose(out, want)


def test_no_repeat_ngram():
  seen = [5, 6, 7, 5, 6, 9, 5, 6]   # bigrams (5,6) were followed by 7 and 9, trigram prefix (5,6) too
  out = process(LOGITS, SamplingParams(no_repeat_ngram_size=3), seen)
  assert np.isneginf(out[[7, 9]]).all() and np.isfinite(np.delete(out, [7, 9])).all()
  out = process(LOGITS, SamplingParams(no_repeat_ngram_size=2), seen)   # after 6 came 7 and 9
  assert set(np.flatnonzero(np.isneginf(out))) == {7, 9}
  out = process(LOGITS, SamplingParams(no_repeat_ngram_size=1), seen)   # every seen token
  assert set(np.flatnonzero(np.isneginf(out))) == set(seen)


def test_min_new_tokens_suppresses_eos_only_until_reached():
  p = SamplingParams(min_new_tokens=3)
  assert np.isneginf(process(LOGITS, p, [1, 2], n_new=2, eos_ids=[2, 5])[[2, 5]]).all()
  np.testing.assert_array_equal(process(LOGITS, p, [1, 2], n_new=3, eos_ids=[2, 5]), LOGITS)


def test_frequency_and_presence_penalty_over_window():
  seen = [4, 4, 4, 9, 1, 9]
  out = process(LOGITS, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, penalty_last_n=4), seen)
  want = LOGITS.copy()
  for t, c in {4: 1, 9: 2, 1: 1}.items(): want[t] -= c * 0.5 + 0.25   # the last 4 tokens: 4, 9, 1, 9
  np.testing.assert_allclose(out, want, rtol=1e-6)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_sampling_warpers_in_hf_order():
  p = SamplingParams(do_sample=True, temperature=0.7, top_k=12, top_p=0.8, min_p=0.05)
  out = process(LOGITS, p, [])
  x = LOGITS / np.float32(0.7)
  keep = x >= np.sort(x)[-12]                                     # top-k
  x = np.where(keep, x, -np.inf)
  order = np.argsort(-x)
  probs = _softmax(x)[order]
  n = int(np.searchsorted(np.cumsum(probs), 0.8 - 1e-12)) + 1     # smallest prefix reaching 0.8
  x2 = np.full_like(x, -np.inf)
  x2[order[:n]] = x[order[:n]]
  pr = _softmax(x2)
  x2[pr < 0.05 * pr.max()] = -np.inf                              # min-p
  np.testing.assert_array_equal(np.isfinite(out), np.isfinite(x2))
  np.testing.assert_allclose(out[np.isfinite(out)], x2[np.isfinite(x2)], rtol=1e-6)


def test_typical_p():
  mass = 0.6
  out = process(LOGITS, SamplingParams(do_sample=True, top_k=0, typical_p=mass), [])
  p = _softmax(LOGITS.astype(np.float64))
  h = -(p * np.log(p)).sum()
  dist = np.abs(-np.log(p) - h)
  keep, total = [], 0.0
  for i in np.argsort(dist):                                       # closest to the entropy first, until mass is covered
    keep.append(i)
    total += p[i]
    if total >= mass: break
  assert set(np.flatnonzero(np.isfinite(out))) == set(keep)


def test_sampling_temperature_zero_is_an_error():
  with pytest.raises(ValueError, match="do_sample=False"): SamplingParams(do_sample=True, temperature=0).validate()


# ---- beam search --------------------------------------------------------------------------------
def tiny_llama(vocab=5) -> Llama:
  args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, hidden_dim=24, max_position_embeddings=16)
  m = Transformer(args, max_seq_len=16)
  m.init_random(seed=3, std=0.5)
  return Llama(m, None)


def test_wide_beam_search_equals_exhaustive_search():
  llm = tiny_llama()
  w = {k: v.numpy() for k, v in llm.model.state_dict().items()}
  prompt, steps, V = [1, 3], 3, 5
  best, best_score = None, -np.inf
  for cont in itertools.product(range(V), repeat=steps):
    seq = prompt + list(cont)
    logits = reference_numpy.forward(w, llm.args, seq[:-1])
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    score = sum(logp[len(prompt) - 1 + i, c] for i, c in enumerate(cont))
    if score > best_score: best, best_score = list(cont), score
  g = llm.generate(prompt, max_new_tokens=steps, num_beams=V ** (steps - 1), eos_token_id=[])
  assert g.tokens == best
  assert g.score == pytest.approx(best_score / steps, rel=1e-4)     # length_penalty 1: sum / generated length
  two = llm.generate(prompt, max_new_tokens=steps, num_beams=V ** (steps - 1), num_return_sequences=2, eos_token_id=[])
  assert two[0].tokens == best and two[0].score >= two[1].score


def test_beam_search_on_stories_is_deterministic_and_beats_greedy(stories):
  kw = dict(max_new_tokens=24, num_beams=4, eos_token_id=[])
  a, b = stories.generate("Lily was", **kw), stories.generate("Lily was", **kw)
  assert a.tokens == b.tokens and a.text == b.text and a.text.startswith(" ")
  greedy = stories.generate("Lily was", max_new_tokens=24, eos_token_id=[])

  def logprob(tokens):
    ids = stories.tokenizer.encode("Lily was") + tokens
    lg = stories.logits(ids[:-1]).astype(np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    return sum(lp[len(ids) - len(tokens) - 1 + i, t] for i, t in enumerate(tokens))
  assert logprob(a.tokens) >= logprob(greedy.tokens) - 1e-4
  assert a.score == pytest.approx(logprob(a.tokens) / 24, abs=1e-3)
  with pytest.raises(ValueError, match="num_return_sequences"): stories.generate("Lily", num_beams=2, num_return_sequences=3)


@pytest.mark.parametrize("kw", [dict(max_new_tokens=40), dict(max_new_tokens=30, do_sample=True, top_p=0.9, seed=5),
                                dict(max_new_tokens=40, stop=["play"], repetition_penalty=1.2)], ids=["greedy", "sampled", "stop"])
def test_batched_prompts_equal_one_by_one(stories, kw):
  """Prompts of different lengths decoded as one left-padded batch; each row stops on its own."""
  prompts = ["Lily was", "Once upon a time, there was a big", "The sun", "Tom"]
  together = stories.generate(prompts, **kw)
  alone = [stories.generate(p, **kw) for p in prompts]
  assert [(g.tokens, g.text, g.finish_reason) for g in together] == [(g.tokens, g.text, g.finish_reason) for g in alone]


def test_sampled_return_sequences_differ_and_reproduce(stories):
  kw = dict(max_new_tokens=20, do_sample=True, top_k=0, num_return_sequences=3, seed=11, eos_token_id=[])
  a, b = stories.generate("Lily was", **kw), stories.generate("Lily was", **kw)
  assert [g.tokens for g in a] == [g.tokens for g in b] and len({tuple(g.tokens) for g in a}) == 3


# ---- seeded sampling across processes and backends -----------------------------------------------
def _sample_in_subprocess(dev: str) -> list[int]:
  code = ("import json; from tinyllama2 import Llama; "
          f"llm = Llama.from_pretrained({str(STORIES)!r}, tokenizer={str(TOK512)!r}); "
          "g = llm.generate('Once upon a time', max_new_tokens=40, do_sample=True, temperature=0.9, top_p=0.9, "
          "top_k=40, repetition_penalty=1.1, seed=1234, eos_token_id=[]); print(json.dumps(g.tokens))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                     env={**os.environ, "DEV": dev})
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_seeded_sampling_same_across_processes_and_backends():
  need(STORIES, TOK512)
  from tinygrad import Device
  cpu = _sample_in_subprocess("CPU")
  assert cpu == _sample_in_subprocess("CPU")
  try: Device["CL"]
  except Exception as e: pytest.skip(f"no OpenCL device here ({e})")
  assert _sample_in_subprocess("CL") == cpu


# ---- streaming ----------------------------------------------------------------------------------
def test_streaming_chinese_and_emoji_equals_final_text():
  need(LLAMA_TOK)
  tok = Tokenizer(LLAMA_TOK)
  text = "宝玉笑道：“妹妹好！”🙂🎉 He said: naïve café — 林黛玉 😀"
  ids = tok.encode(text, bos=False)
  assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)   # byte-fallback pieces split characters
  prompt = tok.encode("Story:", bos=True)
  steps = (TokenStep(0, t, "length" if i == len(ids) - 1 else None, 0.0, 0.0, 0.0) for i, t in enumerate(ids))
  stream = TextStream(steps, prompt, tok, [])
  pieces = list(stream)
  assert "".join(pieces) == stream.generation.text
  assert stream.generation.text.strip() == text and all("\ufffd" not in p for p in pieces)
