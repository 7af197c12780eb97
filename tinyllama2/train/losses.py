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


def reward_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0, center_coef: float = 0.0) -> Tensor:
  """Bradley-Terry loss of a reward model, as trl's RewardTrainer: mean -log sigmoid(r_chosen - r_rejected - margin),
  plus center_coef * mean((r_chosen + r_rejected)^2), which keeps the rewards centred on 0."""
  loss = -(chosen - rejected - margin).logsigmoid().mean()
  return loss + center_coef * (chosen + rejected).square().mean() if center_coef else loss


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             kind: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
  """Per-pair DPO losses from sequence log-probabilities, as trl's DPOTrainer: with h = (policy_chosen - policy_rejected)
  - (ref_chosen - ref_rejected), sigmoid: -log σ(βh) (conservative DPO with label_smoothing), hinge: max(0, 1 - βh)
  (SLiC), ipo: (h - 1/(2β))^2 (IPO; its log-probabilities are per-token means)."""
  h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
  if kind == "sigmoid":
    loss = -(beta * h).logsigmoid() * (1 - label_smoothing)
    return loss - (-beta * h).logsigmoid() * label_smoothing if label_smoothing else loss
  if kind == "hinge": return (1 - beta * h).relu()
  if kind == "ipo": return (h - 1 / (2 * beta)).square()
  raise ValueError(f"unknown DPO loss {kind!r}; use one of {', '.join(DPO_LOSSES)}")
