"""The model against an independent numpy forward pass; KV cache; no recompiles while decoding."""
import numpy as np
import pytest

import reference_numpy
from tinyllama2 import Llama, ModelArgs, Transformer


def random_llama(n_heads: int, n_kv_heads: int, seed: int = 0, tie: bool = False, max_seq_len: int = 64) -> Llama:
  args = ModelArgs(dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=97, hidden_dim=48,
                   max_position_embeddings=max_seq_len, tie_embeddings=tie)
  model = Transformer(args, max_seq_len=max_seq_len)
  model.init_random(seed=seed, std=0.2)
  return Llama(model, None)


def weights_of(llm: Llama) -> dict:
  return {k: v.numpy() for k, v in llm.model.state_dict().items()}


@pytest.mark.parametrize("n_heads,n_kv_heads,tie", [(4, 4, False), (4, 2, True), (4, 1, False)], ids=["MHA", "GQA", "MQA"])
def test_forward_matches_numpy(n_heads, n_kv_heads, tie):
  llm = random_llama(n_heads, n_kv_heads, tie=tie)
  tokens = np.random.default_rng(1).integers(0, 97, 23).tolist()
  expected = reference_numpy.forward(weights_of(llm), llm.args, tokens)
  np.testing.assert_allclose(llm.logits(tokens), expected, atol=2e-4, rtol=1e-4)


def test_kv_cached_decode_equals_full_forward():
  llm = random_llama(4, 2)
  tokens = np.random.default_rng(2).integers(0, 97, 30).tolist()
  full = llm.logits(tokens)
  dec = llm.decoder
  stepwise = [dec.prefill(tokens[:5])]
  stepwise += [dec.step(tokens[pos], pos) for pos in range(5, len(tokens))]
  np.testing.assert_allclose(np.stack(stepwise), full[4:], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_single_prefill():
  llm = random_llama(4, 2)
  tokens = np.random.default_rng(3).integers(0, 97, 40).tolist()
  whole = llm.logits(tokens)
  llm.decoder.prefill_chunk = 16
  np.testing.assert_allclose(llm.logits(tokens), whole, atol=1e-5, rtol=1e-5)


def test_decode_never_recompiles(monkeypatch):
  from tinygrad.device import Compiler
  llm = random_llama(4, 2)
  dec = llm.decoder
  dec.prefill([1, 2, 3])
  for pos in range(3, 8): dec.step(5, pos)          # run, capture, replay
  compiles = []
  original = Compiler.compile_cached
  monkeypatch.setattr(Compiler, "compile_cached", lambda self, src: compiles.append(src) or original(self, src))
  for pos in range(8, 58): dec.step(pos % 97, pos)  # 50 decode steps at new positions
  assert compiles == []


def test_generation_is_deterministic_and_respects_length():
  llm = random_llama(4, 2)
  a = llm.generate([1, 5, 9], max_new_tokens=12, eos_token_id=[])
  b = llm.generate([1, 5, 9], max_new_tokens=12, eos_token_id=[])
  assert a.tokens == b.tokens and len(a.tokens) == 12 and a.finish_reason == "length"
  logits = llm.logits([1, 5, 9] + a.tokens[:-1])
  assert a.tokens == np.argmax(logits[2:], -1).tolist()   # greedy = argmax of the full forward, step by step
