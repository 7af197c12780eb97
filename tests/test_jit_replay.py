"""The decode step replayed through runtime.replay.Replay gives what tinygrad's own TinyJit replay gives."""
import numpy as np
import pytest

from tinygrad import dtypes
from tinygrad.helpers import getenv
from tinyllama2.config import ModelArgs
from tinyllama2.decoder import Decoder
from tinyllama2.devices import resolve_device
from tinyllama2.model import Transformer

DEV = resolve_device(None)


def _decoder(seed: int = 3, replay: bool = True) -> Decoder:
  m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=160), max_seq_len=32,
                  dtype=dtypes.float32, device=DEV)
  m.init_random(seed=seed, std=0.2)
  dec = Decoder(m, replay=replay)
  dec.prefill([1, 7, 9], all_logits=True)
  return dec


@pytest.mark.skipif(not (DEV.startswith("CPU") and getenv("HCQ2")), reason="Replay serves tinygrad's HCQ2 queue on the CPU")
def test_replay_matches_tinygrad_jit_token_by_token():
  fast, plain = _decoder(), _decoder(replay=False)
  tokens, got, want = [5, 11, 42, 3, 99, 0, 17], [], []
  for i, tok in enumerate(tokens):
    got.append(fast.decode_logits(tok, 3 + i).numpy().copy())   # replayed from the third call on
    want.append(plain.decode_logits(tok, 3 + i).numpy().copy())
  assert fast.replaying and not plain.replaying
  np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-6, atol=1e-6)   # same kernels, same order
  assert np.abs(np.stack(got)).max() > 1
  for a, b in zip(fast.slot_caches(), plain.slot_caches()):   # the replayed steps wrote the same cache rows
    np.testing.assert_allclose(a.k.numpy(), b.k.numpy(), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="start_pos=32 is outside"): fast.decode_logits(1, 32)
  with pytest.raises(ValueError, match="token=100 is outside"): fast.decode_logits(100, 10)
  fast.model.weights_changed()
  fast.decode_logits(5, 10)
  assert not fast.replaying   # a new graph is captured, and replayed, after the weights changed
  for pos in (11, 12): fast.decode_logits(5, pos)
  assert fast.replaying
