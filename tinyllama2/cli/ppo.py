"""`tinyllama2 ppo`: RLHF with PPO against a reward model (trl's PPOTrainer), a LoRA policy."""
from __future__ import annotations

import argparse

from .common import add_rl_args, float_flag, rl_options

HELP = "RLHF: PPO of a LoRA policy against a reward model under a KL penalty"


def add_args(p: argparse.ArgumentParser) -> None:
  add_rl_args(p, epochs=4)
  p.add_argument("--kl-coef", type=float_flag(0), default=0.05, help="per-token KL penalty to the reference")
  p.add_argument("--kl-target", type=float_flag(0, above=True), help="adapt --kl-coef towards this KL per completion")
  p.add_argument("--cliprange", type=float_flag(0, above=True), default=0.2, help="policy ratio clip range")
  p.add_argument("--vf-coef", type=float_flag(0), default=0.1, help="weight of the value loss")
  p.add_argument("--gamma", type=float_flag(0, hi=1), default=1.0, help="discount")
  p.add_argument("--lam", type=float_flag(0, hi=1), default=0.95, help="GAE lambda")


def main(a: argparse.Namespace) -> None:
  from ..train.recipes import PPOOptions, train_ppo
  ppo = dict(kl_coef=a.kl_coef, kl_target=a.kl_target, cliprange=a.cliprange, vf_coef=a.vf_coef, gamma=a.gamma, lam=a.lam)
  train_ppo(rl_options(a, PPOOptions, ppo=ppo))
