"""Alignment objectives for the Trainer: a reward model on preference pairs, and DPO against frozen reference
log-probabilities. Both take a batch's chosen and rejected rows through the model in one forward pass (2B rows)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor

from .. import ops
from ..layers import Linear
from ..model import Transformer
from ..reward import last_token_scores
from .data import Pairs
from .losses import DPO_LOSSES, dpo_loss, reward_loss, token_logprobs


# ---- reward model -------------------------------------------------------------------------------
class RewardRows:
  """Pairs as reward-model batches: (chosen tokens, chosen last index, rejected tokens, rejected last, margin)."""

  def __init__(self, pairs: Pairs): self.pairs = pairs
  def __len__(self) -> int: return len(self.pairs)
  @property
  def seq_len(self) -> int: return self.pairs.seq_len + 1   # the whole row is scored
  @property
  def tokens_per_row(self) -> int: return 2 * (self.pairs.seq_len + 1)

  def rows(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
    p = self.pairs
    return p.chosen.tokens[index], p.chosen_last[index], p.rejected.tokens[index], p.rejected_last[index], p.margin[index]


def pair_rows(chosen: Tensor, rejected: Tensor) -> Tensor:
  """Chosen and rejected rows [B, ...] as one batch [2B, ...] with each pair's two rows side by side (c0, r0, c1, r1,
  ...): split over devices along its first axis (data parallel), a batch keeps each pair on one device."""
  return Tensor.stack(chosen, rejected, dim=1).reshape(-1, *chosen.shape[1:])


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
  """Values [2B] of pair_rows' rows → (chosen [B], rejected [B])."""
  pairs = values.reshape(-1, 2)
  return pairs[:, 0], pairs[:, 1]


class RewardModeling:
  """trl's RewardTrainer loss on (chosen, rejected) scores; logs accuracy (chosen scored higher), the mean margin
  r_chosen - r_rejected and the mean scores."""
  metrics = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")

  def __init__(self, model: Transformer, score: Linear, center_rewards_coefficient: float = 0.0):
    self.model, self.score, self.center = model, score, center_rewards_coefficient

  def __call__(self, chosen: Tensor, chosen_last: Tensor, rejected: Tensor, rejected_last: Tensor, margin: Tensor) -> Tensor:
    rc, rr = split_pairs(last_token_scores(self.model, self.score, pair_rows(chosen, rejected),
                                           pair_rows(chosen_last, rejected_last)))
    loss = reward_loss(rc, rr, margin.float(), self.center)
    return Tensor.stack(loss, (rc > rr).float().mean(), (rc - rr).mean(), rc.mean(), rr.mean())


# ---- DPO ----------------------------------------------------------------------------------------
@dataclass
class DPOConfig:
  beta: float = 0.1
  loss_type: str = "sigmoid"       # sigmoid | ipo | hinge
  label_smoothing: float = 0.0     # conservative DPO (sigmoid only)

  def validate(self) -> None:
    if self.loss_type not in DPO_LOSSES: raise ValueError(f"unknown --loss {self.loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    if not self.beta > 0: raise ValueError(f"--beta must be positive, got {self.beta}")
    if not 0 <= self.label_smoothing < 0.5: raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if self.label_smoothing and self.loss_type != "sigmoid": raise ValueError("--label-smoothing is for --loss sigmoid")


def sequence_logprobs(model: Transformer, tokens: Tensor, weights: Tensor) -> Tensor:
  """Sum over the weighted targets of log p(target) for rows [B, T + 1] → [B] float32."""
  return (token_logprobs(model(tokens[:, :-1]), tokens[:, 1:]) * weights.float()).sum(-1)


def reference_logprobs(model: Transformer, pairs: Pairs, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Summed log-probabilities of every pair's chosen and rejected answer under `model` as it is now, for DPO's
  frozen reference: no gradients, but batched and computed as training computes them (pair_rows' batches padded
  to a full batch; the training graph), so a policy still equal to the reference gets the same values."""
  n = len(pairs)
  chosen, rejected = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
  for lo in range(0, n, batch_size):
    idx, k = np.arange(lo, lo + batch_size) % n, min(batch_size, n - lo)
    ct, cw = pairs.chosen.rows(idx)
    rt, rw = pairs.rejected.rows(idx)
    tokens, weights = (pair_rows(Tensor(c, device=model.device), Tensor(r, device=model.device))
                       for c, r in ((ct, rt), (cw, rw)))
    with ops.training_graph(): lp = sequence_logprobs(model, tokens, weights).numpy().reshape(-1, 2)
    chosen[lo:lo + k], rejected[lo:lo + k] = lp[:k, 0], lp[:k, 1]
  return chosen, rejected


class DPORows:
  """Pairs with their reference log-probabilities as DPO batches: (chosen tokens, chosen weights, rejected tokens,
  rejected weights, reference chosen, reference rejected)."""

  def __init__(self, pairs: Pairs, ref_chosen: np.ndarray, ref_rejected: np.ndarray):
    if not len(pairs) == len(ref_chosen) == len(ref_rejected): raise ValueError("one reference log-prob per pair is needed")
    self.pairs, self.ref_chosen, self.ref_rejected = pairs, ref_chosen, ref_rejected
  def __len__(self) -> int: return len(self.pairs)
  @property
  def seq_len(self) -> int: return self.pairs.seq_len
  @property
  def tokens_per_row(self) -> int: return 2 * self.pairs.seq_len

  def rows(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
    c, r = self.pairs.chosen, self.pairs.rejected
    return c.tokens[index], c.weights[index], r.tokens[index], r.weights[index], self.ref_chosen[index], self.ref_rejected[index]


class DirectPreference:
  """trl's DPOTrainer objective and metrics: rewards are β · (policy - reference) log-probability of an answer;
  accuracies is how often chosen's reward is the higher; logps the policy's (per-token means for IPO)."""
  metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")

  def __init__(self, model: Transformer, config: DPOConfig):
    config.validate()
    self.model, self.cfg = model, config

  def __call__(self, chosen: Tensor, chosen_w: Tensor, rejected: Tensor, rejected_w: Tensor, ref_chosen: Tensor,
               ref_rejected: Tensor) -> Tensor:
    w = pair_rows(chosen_w, rejected_w).float()
    lp = sequence_logprobs(self.model, pair_rows(chosen, rejected), w)
    ref = pair_rows(ref_chosen, ref_rejected).float()
    if self.cfg.loss_type == "ipo":   # IPO compares per-token means
      n = w.sum(-1).maximum(1.0)
      lp, ref = lp / n, ref / n
    (pc, pr), (rc, rr) = split_pairs(lp), split_pairs(ref)
    loss = dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing).mean()
    reward_c, reward_r = self.cfg.beta * (pc - rc), self.cfg.beta * (pr - rr)
    return Tensor.stack(loss, reward_c.mean(), reward_r.mean(), (reward_c - reward_r).mean(),
                        (reward_c > reward_r).float().mean(), pc.mean(), pr.mean())
