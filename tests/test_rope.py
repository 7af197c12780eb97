"""RoPE scaling against formulas re-derived here in numpy from Hugging Face's definitions, and through the model."""
import math

import numpy as np
import pytest

import reference_numpy
from tinyllama2 import Llama, ModelArgs, Transformer
from tinyllama2.config import from_hf_config
from tinyllama2.rope import RopeScaling, inv_freq, rope_tables

D, THETA, MAX = 64, 10000.0, 256


def plain(theta=THETA):
  return np.array([theta ** (-(2 * i) / D) for i in range(D // 2)])


def test_linear():
  s = RopeScaling.from_dict({"type": "linear", "factor": 4.0})
  np.testing.assert_allclose(inv_freq(D, THETA, s, MAX), plain() / 4.0, rtol=1e-12)


def test_dynamic_ntk():
  s = RopeScaling.from_dict({"rope_type": "dynamic", "factor": 2.0})
  np.testing.assert_allclose(inv_freq(D, THETA, s, MAX, seq_len=MAX), plain(), rtol=1e-12)  # unchanged up to max
  L = 3 * MAX
  base = THETA * ((2.0 * L / MAX) - 1.0) ** (D / (D - 2))
  np.testing.assert_allclose(inv_freq(D, THETA, s, MAX, seq_len=L), plain(base), rtol=1e-12)
  cos, sin = rope_tables(D, THETA, s, MAX, L)   # row p uses the frequencies for length p + 1
  p = L - 1
  np.testing.assert_allclose(cos[p], np.cos(p * plain(base)), atol=1e-6)
  np.testing.assert_allclose(cos[10], np.cos(10 * plain()), atol=1e-6)


def test_llama3():
  cfg = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}
  got = inv_freq(D, 500000.0, RopeScaling.from_dict(cfg), 1024)
  expected = []
  for f in plain(500000.0):
    wavelen = 2 * math.pi / f
    if wavelen < 64 / 4.0: expected.append(f)                 # short wavelengths kept
    elif wavelen > 64 / 1.0: expected.append(f / 8.0)         # long wavelengths divided by factor
    else:
      smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  assert got[0] == plain(500000.0)[0] and got[-1] == pytest.approx(plain(500000.0)[-1] / 8)


def test_yarn():
  factor, orig = 4.0, 128
  got = inv_freq(D, THETA, RopeScaling.from_dict({"type": "yarn", "factor": factor, "original_max_position_embeddings": orig}), 512)
  dim_for = lambda rot: D * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(THETA))  # noqa: E731
  lo, hi = max(math.floor(dim_for(32)), 0), min(math.ceil(dim_for(1)), D - 1)
  expected = []
  for i, f in enumerate(plain()):
    ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)   # 0: extrapolate (keep f), 1: interpolate (f / factor)
    expected.append(f * (1 - ramp) + f / factor * ramp)
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  cos, _ = rope_tables(D, THETA, RopeScaling.from_dict({"type": "yarn", "factor": factor}), orig, 4)
  assert cos[0, 0] == pytest.approx(0.1 * math.log(factor) + 1)   # attention factor scales cos/sin


def test_hf_config_spellings():
  base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
          "vocab_size": 10, "intermediate_size": 32, "max_position_embeddings": 128}
  old = from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
  new = from_hf_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
  legacy = from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert old.rope_scaling == new.rope_scaling == legacy.rope_scaling and old.rope_theta == new.rope_theta == 5e5
  assert old.default_max_seq_len() == 256
  with pytest.raises(ValueError, match="unknown rope_scaling type"):
    from_hf_config({**base, "rope_scaling": {"type": "bogus", "factor": 2.0}})


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 16},
                                     {"type": "yarn", "factor": 2.0}], ids=["none", "linear", "dynamic", "llama3", "yarn"])
def test_long_sequence_through_model(scaling):
  """Past max_position_embeddings (16) every scaling gives finite logits, equal to numpy with the same tables."""
  args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48,
                   max_position_embeddings=16, rope_scaling=scaling)
  model = Transformer(args, max_seq_len=40)
  model.init_random(seed=3, std=0.2)
  llm = Llama(model, None)
  tokens = np.random.default_rng(0).integers(0, 50, 40).tolist()
  logits = llm.logits(tokens)
  assert np.isfinite(logits).all()
  s = args.rope_scaling
  # numpy angles from the formula (dynamic: HF's forward rotates the whole prompt with the frequencies of its
  # length); yarn's attention factor scales q and k
  angles = np.outer(np.arange(40), inv_freq(8, 10000.0, s, 16, seq_len=40))
  scale = (0.1 * math.log(2.0) + 1) if s is not None and s.type == "yarn" else 1.0
  w = {k: v.numpy() for k, v in model.state_dict().items()}
  np.testing.assert_allclose(logits, reference_numpy.forward(w, args, tokens, angles, scale), atol=2e-4, rtol=1e-4)


def test_dynamic_ntk_prefill_and_decode_match_hf():
  """Dynamic NTK past the trained context (16): a prompt prefilled in one call is rotated with the frequencies of
  its length L (HF's forward), the next token with those of L + 1 while the cached keys keep theirs (HF's
  incremental decoding); generate's compiled prefill and logits() agree."""
  args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48,
                   max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
  model = Transformer(args, max_seq_len=48)
  model.init_random(seed=4, std=0.2)
  llm, s = Llama(model, None), args.rope_scaling
  tokens = np.random.default_rng(1).integers(0, 50, 30).tolist()
  w = {k: v.numpy() for k, v in model.state_dict().items()}
  angles = np.outer(np.arange(31), inv_freq(8, 10000.0, s, 16, seq_len=30))
  angles[30] = 30 * inv_freq(8, 10000.0, s, 16, seq_len=31)
  ref = reference_numpy.forward(w, args, tokens + [7], angles)
  np.testing.assert_allclose(llm.logits(tokens), ref[:30], atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(llm.decoder.prefill(tokens), ref[29], atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(llm.decoder.step(7, 30), ref[30], atol=2e-4, rtol=1e-4)
