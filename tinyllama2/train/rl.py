"""Reinforcement learning from rewards on the Trainer: PPO (RLHF, as trl's PPOTrainer) and GRPO (trl's GRPOTrainer).

An iteration samples completions of a batch of prompts through the engine (together, each from its own seeded
random stream), scores them (a reward model or Python reward functions), computes what the losses compare against
— the sampling policy's log-probs, the reference's (the same weights with the LoRA adapter switched off), PPO's
values and GAE advantages, GRPO's group-normalised advantages — then runs a few epochs of minibatch updates on them.
Rows are prompt + completion (+ EOS), right-padded to one width, so every update runs one compiled graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tinygrad import Tensor

from .. import ops
from ..generate import Generation
from ..layers import Linear
from ..model import Transformer
from .losses import token_logprobs

RewardFn = Callable[[list[str], list[str]], Sequence[float]]   # (prompts, completions) -> one reward per completion


# ---- rollouts -----------------------------------------------------------------------------------
@dataclass
class Rollouts:
  """Completions of prompts as training rows: tokens [N, W] (prompt, completion, EOS if it ended so, then padding)
  and mask [N, W - 1], 1 on the targets that are completion tokens."""
  tokens: np.ndarray
  mask: np.ndarray
  prompts: list[str]
  completions: list[str]

  @property
  def lengths(self) -> np.ndarray: return self.mask.sum(1).astype(np.int64)


def pack(generations: Sequence[Generation], eos_id: int, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows of prompt + completion (+ EOS when generation ended on it), right-padded to `width` tokens."""
  tokens = np.full((len(generations), width), pad_id, dtype=np.int32)
  mask = np.zeros((len(generations), width - 1), dtype=np.float32)
  for i, g in enumerate(generations):
    completion = g.tokens + ([eos_id] if g.finish_reason == "stop" else [])
    row = (g.prompt_tokens + completion)[:width]
    tokens[i, :len(row)] = row
    mask[i, len(g.prompt_tokens) - 1:len(row) - 1] = 1
  return tokens, mask


def token_values(model: Transformer, tokens: Tensor, value_head: Linear | None = None,
                 temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
  """log p(target) [B, W - 1] of rows [B, W] under the distribution sampled from (logits / temperature), and the
  value head's estimate at each input position [B, W - 1]."""
  h = model.forward_hidden(model.embed(tokens[:, :-1]), 0, None)
  logits = model.logits_from_hidden(h)
  logp = token_logprobs(logits / temperature if temperature != 1.0 else logits, tokens[:, 1:])
  values = (h.float() @ value_head.weight.T.float())[..., 0] if value_head is not None else None
  return logp, values


def rollout_stats(model: Transformer, tokens: np.ndarray, batch_size: int, value_head: Linear | None = None,
                  temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
  """token_values over all rows without gradients, batched as the updates batch them (rows padded to full batches)."""
  n = len(tokens)
  logp = np.zeros((n, tokens.shape[1] - 1), dtype=np.float32)
  values = np.zeros_like(logp) if value_head is not None else None
  for lo in range(0, n, batch_size):
    idx, k = np.arange(lo, lo + batch_size) % n, min(batch_size, n - lo)
    with ops.training_graph():   # the update's graph: a policy that has not moved gives ratio 1
      lp, v = token_values(model, Tensor(tokens[idx], device=model.device), value_head, temperature)
      logp[lo:lo + k] = lp.numpy()[:k]
      if values is not None: values[lo:lo + k] = v.numpy()[:k]
  return logp, values


class RLRows:
  """Rollout rows with per-target arrays [N, W - 1] (old log-probs, advantages, ...) as a Trainer Dataset."""

  def __init__(self, tokens: np.ndarray, mask: np.ndarray, *arrays: np.ndarray):
    self.tokens, self.mask, self.arrays = tokens, mask, arrays
  def __len__(self) -> int: return len(self.tokens)
  @property
  def seq_len(self) -> int: return self.tokens.shape[1] - 1
  @property
  def tokens_per_row(self) -> int: return self.seq_len

  def rows(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
    return (self.tokens[index], self.mask[index], *(a[index] for a in self.arrays))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor: return (x * mask).sum() / mask.sum().maximum(1.0)


# ---- PPO ----------------------------------------------------------------------------------------
def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """Generalised advantage estimation over each row's completion targets (contiguous where mask is 1):
  δ_t = r_t + γ V_{t+1} - V_t (V after the last token is 0), A_t = δ_t + γλ A_{t+1}; returns = A + V."""
  adv = np.zeros_like(values, dtype=np.float64)
  for i in range(len(rewards)):
    ts = np.flatnonzero(mask[i])
    last = 0.0
    for j in range(len(ts) - 1, -1, -1):
      t = ts[j]
      next_v = values[i, ts[j + 1]] if j + 1 < len(ts) else 0.0
      last = rewards[i, t] + gamma * next_v - values[i, t] + gamma * lam * last
      adv[i, t] = last
  return adv.astype(np.float32), (adv + values * mask).astype(np.float32)


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """(x - mean) / std over the masked entries (trl whitens PPO's advantages this way)."""
  m = mask.astype(bool)
  mean, std = x[m].mean(), x[m].std()
  return np.where(m, (x - mean) / (std + 1e-8), 0.0).astype(np.float32)


class AdaptiveKL:
  """Ziegler et al.'s KL controller: the coefficient grows when the KL is above target and shrinks below it
  (fixed when target is None)."""

  def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
    self.value, self.target, self.horizon = coef, target, horizon

  def update(self, kl: float, n_steps: int) -> None:
    if self.target is None: return
    error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
    self.value *= 1 + error * n_steps / self.horizon


@dataclass
class PPOConfig:
  kl_coef: float = 0.05
  kl_target: float | None = None   # None: fixed kl_coef; else adapted towards this KL per sequence
  kl_horizon: int = 10000
  gamma: float = 1.0
  lam: float = 0.95
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  whiten_advantages: bool = True


def ppo_rewards(scores: np.ndarray, logp: np.ndarray, ref_logp: np.ndarray, mask: np.ndarray,
                kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
  """trl's per-token rewards: -kl_coef · (log π - log π_ref) at every completion token, plus the score at the last.
  Returns (rewards, kl) [N, W - 1]."""
  kl = (logp - ref_logp) * mask
  rewards = -kl_coef * kl
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)   # each row's last completion target
  rewards[np.arange(len(scores)), last] += scores
  return rewards.astype(np.float32), kl.astype(np.float32)


class PPOObjective:
  """Clipped policy loss and clipped value loss over one minibatch of rollout rows (tokens, mask, old log-probs,
  advantages, returns, old values), with trl's metric names."""
  metrics = ("policy/approxkl", "policy/clipfrac", "val/ratio", "loss/policy", "loss/value", "val/clipfrac")

  def __init__(self, model: Transformer, value_head: Linear, cfg: PPOConfig, temperature: float = 1.0):
    self.model, self.value_head, self.cfg, self.temperature = model, value_head, cfg, temperature

  def __call__(self, tokens: Tensor, mask: Tensor, old_logp: Tensor, advantages: Tensor, returns: Tensor,
               old_values: Tensor) -> Tensor:
    c, m = self.cfg, mask.float()
    logp, values = token_values(self.model, tokens, self.value_head, self.temperature)
    diff = (m > 0).where(logp - old_logp, 0.0)
    ratio = diff.exp()
    pg1, pg2 = -advantages * ratio, -advantages * ratio.clip(1 - c.cliprange, 1 + c.cliprange)
    pg_loss = masked_mean(pg1.maximum(pg2), m)
    v_clipped = old_values + (values - old_values).clip(-c.cliprange_value, c.cliprange_value)
    vf1, vf2 = (values - returns).square(), (v_clipped - returns).square()
    vf_loss = 0.5 * masked_mean(vf1.maximum(vf2), m)
    return Tensor.stack(pg_loss + c.vf_coef * vf_loss, 0.5 * masked_mean(diff.square(), m),
                        masked_mean((pg2 > pg1).float(), m), masked_mean(ratio, m), pg_loss, vf_loss,
                        masked_mean((vf2 > vf1).float(), m))


# ---- GRPO ---------------------------------------------------------------------------------------
def group_advantages(rewards: np.ndarray, group: int, scale: bool = True) -> np.ndarray:
  """Each completion's reward minus its group's mean (the group: the completions of one prompt, consecutive),
  divided by the group's standard deviation (+ 1e-4, as trl) when `scale`."""
  r = rewards.reshape(-1, group).astype(np.float64)
  adv = r - r.mean(1, keepdims=True)
  if scale: adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4) if group > 1 else adv
  return adv.reshape(-1).astype(np.float32)


@dataclass
class GRPOConfig:
  num_generations: int = 4     # completions per prompt (a group)
  beta: float = 0.0            # KL penalty to the reference (0: none, trl's default)
  epsilon: float = 0.2         # clip range of the ratio
  scale_rewards: bool = True
  loss_type: str = "grpo"      # grpo: mean over each completion's tokens, then over completions; bnpo: over the tokens
                               # of the minibatch


class GRPOObjective:
  """The clipped surrogate with group-relative advantages (per completion, the same at each of its tokens) and,
  with beta > 0, the k3 KL estimate exp(ref - logp) - (ref - logp) - 1 at each token."""
  metrics = ("kl", "clip_ratio", "val/ratio")

  def __init__(self, model: Transformer, cfg: GRPOConfig, temperature: float = 1.0):
    if cfg.loss_type not in ("grpo", "bnpo"): raise ValueError(f"unknown --loss-type {cfg.loss_type!r} (grpo or bnpo)")
    self.model, self.cfg, self.temperature = model, cfg, temperature

  def __call__(self, tokens: Tensor, mask: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor) -> Tensor:
    c, m = self.cfg, mask.float()
    logp, _ = token_values(self.model, tokens, temperature=self.temperature)
    ratio = (m > 0).where(logp - old_logp, 0.0).exp()
    adv = advantages.reshape(-1, 1)
    s1, s2 = ratio * adv, ratio.clip(1 - c.epsilon, 1 + c.epsilon) * adv
    per_token = -s1.minimum(s2)
    d = (m > 0).where(ref_logp - logp, 0.0)
    kl = d.exp() - d - 1
    if c.beta: per_token = per_token + c.beta * kl
    if c.loss_type == "grpo": loss = ((per_token * m).sum(-1) / m.sum(-1).maximum(1.0)).mean()
    else: loss = masked_mean(per_token, m)
    return Tensor.stack(loss, masked_mean(kl, m), masked_mean((s2 < s1).float(), m), masked_mean(ratio, m))


def kl_per_sequence(logp: np.ndarray, ref_logp: np.ndarray, mask: np.ndarray) -> float:
  """Mean over rows of the summed log π - log π_ref of the completion (trl's objective/kl)."""
  return float(((logp - ref_logp) * mask).sum(1).mean()) if len(mask) else math.nan
