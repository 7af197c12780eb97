"""Training losses on tinygrad tensors."""
from __future__ import annotations

from tinygrad import Tensor


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
  """log p(target) for logits [..., V] and int targets [...] (selected by comparison with an arange)."""
  logp = logits.float().log_softmax(-1)
  onehot = Tensor.arange(logits.shape[-1]) == targets.unsqueeze(-1)
  return onehot.where(logp, 0.0).sum(-1)


def lm_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
  """Mean next-token cross-entropy over the positions whose weight is 1 (masked SFT: response tokens only).

  logits [B, T, V], targets [B, T] ints, weights [B, T] of 0/1."""
  nll = -token_logprobs(logits, targets)
  w = weights.float()
  return (nll * w).sum() / w.sum().maximum(1.0)
