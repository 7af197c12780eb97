"""Sampling, streaming, stop strings and the Llama-2 chat template."""
import numpy as np
import pytest

from conftest import LLAMA_TOK, need
from tinyllama2 import Llama2ChatTemplate, Tokenizer
from tinyllama2.sampling import SamplingParams, choose, process


def test_seeded_sampling_reproduces(stories):
  kw = dict(max_new_tokens=40, do_sample=True, temperature=1.0, top_p=0.9, eos_token_id=[])
  a, b = stories.generate("Once upon a time", seed=7, **kw), stories.generate("Once upon a time", seed=7, **kw)
  c = stories.generate("Once upon a time", seed=8, **kw)
  assert a.tokens == b.tokens and a.tokens != c.tokens


def test_sampler_follows_the_distribution():
  logits = np.log(np.array([0.5, 0.3, 0.2, 1e-9], dtype=np.float32))
  params = SamplingParams(do_sample=True, top_k=0)
  rng = np.random.Generator(np.random.PCG64(0))
  draws = np.bincount([choose(process(logits, params, []), params, rng) for _ in range(20000)], minlength=4) / 20000
  np.testing.assert_allclose(draws, [0.5, 0.3, 0.2, 0.0], atol=0.015)
  top = SamplingParams(do_sample=True, top_k=0, top_p=0.7)  # keeps {0.5, 0.3}: the smallest set reaching 0.7
  draws = np.bincount([choose(process(logits, top, []), top, rng) for _ in range(20000)], minlength=4) / 20000
  np.testing.assert_allclose(draws, [0.625, 0.375, 0, 0], atol=0.015)


def test_streaming_concatenates_to_text(stories):
  stream = stories.generate("Lily was", max_new_tokens=60, stream=True)
  pieces = list(stream)
  assert len(pieces) > 5 and "".join(pieces) == stream.generation.text
  assert stream.generation.text.startswith(" a little girl")   # the leading space of the continuation is kept


def test_stop_string_cuts_text(stories):
  full = stories.generate("Lily was", max_new_tokens=60)
  stop = full.text[20:26]
  cut = stories.generate("Lily was", max_new_tokens=60, stop=[stop])
  assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
  assert cut.decode_tokens_per_s > 0 and cut.time_to_first_token_s > 0
  stream = stories.generate("Lily was", max_new_tokens=60, stop=stop, stream=True)
  assert "".join(stream) == cut.text


def test_llama2_chat_template_ids():
  """A 3-turn dialogue with a system prompt, built by hand from Meta's chat_completion formula."""
  need(LLAMA_TOK)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=str(LLAMA_TOK))
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."},
          {"role": "assistant", "content": " Blue "}, {"role": "user", "content": "Another?"}]
  # Meta prepends the system block to the raw user content and strips only the ends: " Hi! " keeps its left space
  expected = [1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi! [/INST] Hello. ") + [2]
  expected += [1] + sp.encode("[INST] Name a color. [/INST] Blue ") + [2]
  expected += [1] + sp.encode("[INST] Another? [/INST]")
  assert Llama2ChatTemplate().encode(msgs, Tokenizer(LLAMA_TOK)) == expected
  with pytest.raises(ValueError, match="alternate"):
    Llama2ChatTemplate().encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], Tokenizer(LLAMA_TOK))


def test_eos_stops_with_reason_stop(stories):
  g = stories.generate("Lily was", max_new_tokens=60)
  eos_at = g.tokens[10]
  g2 = stories.generate("Lily was", max_new_tokens=60, eos_token_id=eos_at)
  assert g2.finish_reason == "stop" and g2.tokens == g.tokens[:g.tokens.index(eos_at)]


def test_to_numpy_reads_buffers_views_and_other_dtypes_like_numpy():
  from tinygrad import Tensor
  from tinyllama2.runtime.readback import to_numpy
  from tinyllama2.devices import resolve_device
  a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  t = Tensor(a, device=resolve_device(None)).contiguous().realize()
  for view, ref in ((t, a), (t.reshape(6, 4), a.reshape(6, 4)), (t.permute(2, 0, 1), a.transpose(2, 0, 1)),
                    (t[1], a[1]), (t[:, 1:, ::2], a[:, 1:, ::2]), (t.cast("int32"), a.astype(np.int32))):
    got = to_numpy(view)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
  got = to_numpy(t)
  got[0, 0, 0] = -1   # a copy: the tensor keeps its value
  assert t.numpy()[0, 0, 0] == 0
