"""`tinyllama2 grpo`: Group Relative Policy Optimization (trl's GRPOTrainer), a LoRA policy."""
from __future__ import annotations

import argparse

from .common import add_rl_args, float_flag, int_flag, rl_options

HELP = "GRPO: groups of sampled completions per prompt, advantages relative to the group"


def add_args(p: argparse.ArgumentParser) -> None:
  add_rl_args(p, epochs=1)
  p.add_argument("--num-generations", type=int_flag(2), default=4, help="completions per prompt (a group)")
  p.add_argument("--beta", type=float_flag(0), default=0.0, help="KL penalty to the reference (0 = none, as trl)")
  p.add_argument("--epsilon", type=float_flag(0, above=True), default=0.2, help="ratio clip range")
  p.add_argument("--no-scale-rewards", action="store_true", help="advantages not divided by the group's std")
  p.add_argument("--loss-type", choices=["grpo", "bnpo"], default="grpo",
                 help="grpo: mean over each completion's tokens then completions; bnpo: mean over all tokens")


def main(a: argparse.Namespace) -> None:
  from ..train.recipes import GRPOOptions, train_grpo
  grpo = dict(num_generations=a.num_generations, beta=a.beta, epsilon=a.epsilon, scale_rewards=not a.no_scale_rewards,
              loss_type=a.loss_type)
  train_grpo(rl_options(a, GRPOOptions, grpo=grpo))
