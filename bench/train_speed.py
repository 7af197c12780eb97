"""Training throughput: tokens/s of a train step (forward, backward, AdamW) for full fine-tuning and LoRA.

  python bench/train_speed.py --shape stories15M --seq-len 256 --batch-size 4 [--device CL]
Random weights of a preset shape; the first steps compile and are not counted.
"""
import argparse
import sys
import time

import numpy as np

from tinyllama2 import Transformer, lora
from tinyllama2.cli import run_cli
from tinyllama2.config import PRESETS
from tinyllama2.train import Blocks, TrainConfig, Trainer


def tokens_per_s(shape: str, mode: str, seq_len: int, batch: int, steps: int, device: str | None) -> float:
  args = PRESETS[shape]
  model = Transformer(args, max_seq_len=seq_len, device=device)
  model.init_random(0)
  params = (lora.inject(model, lora.LoraConfig(r=8, target_modules=list(lora.MODULES))) if mode == "lora"
            else model.state_dict())
  rows = np.random.default_rng(0).integers(0, args.vocab_size, size=(batch * (steps + 3), seq_len + 1)).astype(np.int32)
  t = Trainer(model, params, Blocks(rows, np.ones((len(rows), seq_len), np.float32)), None,
              TrainConfig(out_dir="/tmp/tinyllama2-train-speed", batch_size=batch, max_steps=steps + 3, save_every=10**9))
  for _ in range(3): t.train_step()   # compile and capture
  t0 = time.perf_counter()
  for _ in range(steps): t.train_step()
  return steps * batch * seq_len / (time.perf_counter() - t0)


def main(a: argparse.Namespace) -> None:
  print("shape | mode | seq_len | batch | train tokens/s")
  for mode in ("full", "lora"):
    tps = tokens_per_s(a.shape, mode, a.seq_len, a.batch_size, a.steps, a.device)
    print(f"{a.shape} | {mode} | {a.seq_len} | {a.batch_size} | {tps:.0f}", flush=True)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description="train-step tokens/s, full fine-tuning vs LoRA")
  p.add_argument("--shape", default="stories15M", choices=list(PRESETS), help="preset model shape")
  p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
  p.add_argument("--batch-size", type=int, default=4, help="rows per step")
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  sys.exit(run_cli(main, p.parse_args()))
