"""The decode step replayed through jit_replay.Replay gives what tinygrad's own TinyJit replay gives."""
import numpy as np
import pytest

from tinygrad import Tensor, dtypes
from tinygrad.helpers import getenv
from tinyllama2.config import ModelArgs
from tinyllama2.model import Transformer, resolve_device

DEV = resolve_device(None)


def _model(seed: int = 3) -> Transformer:
  m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=160), max_seq_len=32,
                  dtype=dtypes.float32, device=DEV)
  m.init_random(seed=seed, std=0.2)
  m.prefill(Tensor([[1, 7, 9]], device=DEV), 0).realize()
  return m


@pytest.mark.skipif(not (DEV.startswith("CPU") and getenv("HCQ2")), reason="Replay serves tinygrad's HCQ2 queue on the CPU")
def test_replay_matches_tinygrad_jit_token_by_token():
  fast, plain = _model(), _model()
  tokens, got, want = [5, 11, 42, 3, 99, 0, 17], [], []
  for i, tok in enumerate(tokens):
    got.append(fast._runtime.decode(tok, 3 + i).numpy().copy())   # replayed from the third call on
    want.append(plain._runtime.decode_jit(plain._runtime.tok_var.bind(tok), plain._runtime.pos_var.bind(3 + i)).numpy().copy())
  from tinyllama2.jit_replay import Replay
  assert isinstance(fast._runtime.decode_replay, Replay)
  np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-6, atol=1e-6)   # same kernels, same order
  assert np.abs(np.stack(got)).max() > 1
  for a, b in zip(fast._runtime.caches(1), plain._runtime.caches(1)):   # the replayed steps wrote the same cache rows
    np.testing.assert_allclose(a.k.numpy(), b.k.numpy(), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="start_pos=32 is outside"): fast._runtime.decode(1, 32)
  with pytest.raises(ValueError, match="token=100 is outside"): fast._runtime.decode(100, 10)
  fast._runtime.reset_jits()
  assert fast._runtime.decode_replay is None   # a new graph is captured, and replayed, after a reset
