"""`tinyllama2 rm`: train a reward model on preference pairs; `tinyllama2 rm score`: score texts with one."""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_train_args, float_flag
from .finetune import add_tuning_args, finetune_options

HELP = "train a reward model on preference pairs (rm score: score texts with it)"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("action", nargs="?", choices=["train", "score"], default="train",
                 help="train (default) a reward model, or score texts with a trained one (--model)")
  add_tuning_args(p, "preference pairs: trl's prompt/chosen/rejected or LLaMA-Factory's ShareGPT format (JSON or JSONL)",
                  data_required=False)
  p.add_argument("--center-rewards-coefficient", type=float_flag(0), default=0.0,
                 help="adds C * mean((r_chosen + r_rejected)^2) to the loss, keeping rewards centred on 0 (trl)")
  p.add_argument("--text", action="append", default=[], help="rm score: a text to score (repeat; default: stdin lines)")
  p.add_argument("--json", action="store_true", help="rm score: print a JSON list of {text, score}")
  p.set_defaults(lora_dropout=0.0)   # trl disables dropout for preference training
  add_train_args(p, steps=200, lr=1e-4, batch=8, out_required=False)


def main(a: argparse.Namespace) -> None:
  if a.action == "score": return score(a)
  from ..train.recipes import RewardOptions, train_reward_model
  if not a.out: raise ValueError("--out is required for training: the folder for checkpoints and the reward model")
  train_reward_model(finetune_options(a, RewardOptions, center_rewards_coefficient=a.center_rewards_coefficient))


def score(a: argparse.Namespace) -> None:
  """Each text (BOS text EOS) through the reward model, one score per line."""
  from ..llama import Llama
  if a.devices: raise ValueError("--devices is for training: rm score runs on one device (--device)")
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, device=a.device)
  texts = a.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
  if not texts: raise ValueError("nothing to score: pass --text TEXT (repeatable) or texts on stdin, one per line")
  scores = llm.reward(texts)
  if a.json: print(json.dumps([{"text": t, "score": float(s)} for t, s in zip(texts, scores)], ensure_ascii=False))
  else:
    for s in scores: print(f"{s:.6f}")
