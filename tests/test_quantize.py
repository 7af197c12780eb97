"""Q8_0 / Q4_0 layers against numpy re-implementations of llama.cpp's reference quantizers."""
import numpy as np
import pytest

from conftest import STORIES, TOK512, need
from tinygrad import Tensor
from tinyllama2 import Llama
from tinyllama2.quantize import QuantLinear


def np_q8_0(w):
  """ggml quantize_row_q8_0_ref: d = amax / 127, q = round(x / d); d stored as fp16."""
  b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
  d = np.abs(b).max(-1) / np.float32(127)
  inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
  q = np.rint(b * inv[..., None])
  return (q * d.astype(np.float16).astype(np.float32)[..., None]).reshape(w.shape)


def np_q4_0(w):
  """ggml quantize_row_q4_0_ref: max = the signed value of largest |x|, d = max / -8,
  q = min(15, (int)(x / d + 8.5)), x' = (q - 8) * d."""
  b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
  idx = np.abs(b).argmax(-1)
  mx = np.take_along_axis(b, idx[..., None], -1)[..., 0]
  d = mx / np.float32(-8)
  inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
  q = np.minimum(15, np.trunc(b * inv[..., None] + np.float32(8.5)))
  return ((q - 8) * d.astype(np.float16).astype(np.float32)[..., None]).reshape(w.shape)


@pytest.mark.parametrize("mode,reference", [("int8", np_q8_0), ("int4", np_q4_0)])
def test_dequantized_weights_match_reference(mode, reference):
  w = (np.random.default_rng(0).standard_normal((48, 96)) * 0.1).astype(np.float32)
  q = QuantLinear.from_float(Tensor(w), mode)
  np.testing.assert_allclose(q.dequantize().numpy(), reference(w), rtol=1e-6, atol=1e-7)
  assert q.nbytes() == w.size * (1 if mode == "int8" else 0.5) + w.size // 32 * 2   # bytes read per decode step


@pytest.mark.parametrize("mode,reference", [("int8", np_q8_0), ("int4", np_q4_0)])
def test_quantized_matmul_equals_dequantize_then_matmul(mode, reference):
  rng = np.random.default_rng(1)
  w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
  x = rng.standard_normal((3, 5, 128)).astype(np.float32)
  got = QuantLinear.from_float(Tensor(w), mode)(Tensor(x)).numpy()
  np.testing.assert_allclose(got, x @ reference(w).T, rtol=1e-4, atol=1e-4)


def test_nibble_layout_is_gguf():
  """Element j of a block sits in the low nibble of byte j, element j + 16 in the high nibble."""
  w = np.zeros((1, 32), np.float32)
  w[0, 3], w[0, 19], w[0, 0] = 1.0, -1.0, -8.0    # d = -8 / -8 = 1
  q = QuantLinear.from_float(Tensor(w), "int4")
  packed = q.packed.numpy().reshape(16)
  assert packed[3] & 15 == 9 and packed[3] >> 4 == 7 and packed[0] & 15 == 0


@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.97), ("int4", 0.75)])
def test_quantized_stories_stay_close(stories, reference, mode, min_agreement):
  need(STORIES, TOK512)
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:200]
  q = Llama.from_pretrained(STORIES, tokenizer=TOK512, quantize=mode)
  assert q.model.quantization == mode
  agreement = (q.logits(tokens).argmax(-1) == stories.logits(tokens).argmax(-1)).mean()
  assert agreement >= min_agreement


def test_unknown_quantization():
  need(STORIES)
  with pytest.raises(ValueError, match="unknown quantize"):
    Llama.from_pretrained(STORIES, quantize="int3")
