"""Training throughput: tokens/s of a train step (forward, backward, AdamW) for full fine-tuning and LoRA.

  python bench/train_speed.py --shape stories15M --seq-len 256 --batch-size 4 [--device CL] [--torch python3]
Random weights of a preset shape; the first steps compile and are not counted. --torch PYTHON times the same step
in transformers (+ peft for LoRA) on PyTorch after each of ours (bench/torch_train_step.py) and prints the ratio.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinyllama2 import Transformer, lora
from tinyllama2.cli import run_cli
from tinyllama2.config import PRESETS, to_hf_config
from tinyllama2.runtime import cpu_threads
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


def torch_tokens_per_s(python: str, shape: str, mode: str, seq_len: int, batch: int, steps: int) -> float:
  """The same step in transformers (+ peft) on PyTorch, run by `python` (bench/torch_train_step.py)."""
  config = dict(to_hf_config(PRESETS[shape].replace(max_position_embeddings=max(seq_len, 1))), use_cache=False)
  script = Path(__file__).with_name("torch_train_step.py")
  cmd = [python, str(script), json.dumps(config), "--mode", mode, "--seq-len", str(seq_len), "--batch-size",
         str(batch), "--steps", str(steps), "--threads", str(cpu_threads.config.threads)]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise ValueError(f"--torch {python}: the PyTorch step failed: {last}")
  return float(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main(a: argparse.Namespace) -> None:
  print("shape | mode | seq_len | batch | train tokens/s" + (" | PyTorch tokens/s | ratio" if a.torch else ""))
  for mode in ("full", "lora"):
    tps = tokens_per_s(a.shape, mode, a.seq_len, a.batch_size, a.steps, a.device)
    row = f"{a.shape} | {mode} | {a.seq_len} | {a.batch_size} | {tps:.0f}"
    if a.torch:   # measured right after ours, in the same run: the machine's speed drifts
      ref = torch_tokens_per_s(a.torch, a.shape, mode, a.seq_len, a.batch_size, a.steps)
      row += f" | {ref:.0f} | {tps / ref:.2f}x"
    print(row, flush=True)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description="train-step tokens/s, full fine-tuning vs LoRA")
  p.add_argument("--shape", default="stories15M", choices=list(PRESETS), help="preset model shape")
  p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
  p.add_argument("--batch-size", type=int, default=4, help="rows per step")
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  p.add_argument("--torch", metavar="PYTHON", help="also time the same step in transformers (+ peft) on PyTorch, run "
                                                   "by this interpreter (e.g. python3), and print the ratio")
  sys.exit(run_cli(main, p.parse_args()))
