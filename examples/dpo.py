"""DPO on preference pairs (a LoRA adapter against the frozen model), then how the preference metrics moved.

  python examples/dpo.py --model tinyllama2/default_model --data ../shared/preference/dpo_en_demo.json \
      --seq-len 256 --max-steps 60 --batch-size 4 --out runs/dpo
The adapter lands in OUT/adapter (PEFT format): chat with it via `tinyllama2 chat --model MODEL --adapter OUT/adapter`.
"""
import argparse
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, dpo, run_cli


def run(a: argparse.Namespace) -> None:
  from pathlib import Path

  from tinyllama2.train.trainer import read_metrics
  dpo.main(a)
  rows = read_metrics(Path(a.out) / "metrics.jsonl")
  evals = [r for r in rows if "val_rewards/accuracies" in r]
  step_s = sorted(a.batch_size * a.grad_accum * 2 * a.seq_len / r["tokens_per_s"] for r in rows[2:] or rows)
  first, last = rows[0], rows[-1]
  print(f"loss {first['loss']:.3f} -> {last['loss']:.3f}, rewards/margins {first['rewards/margins']:.3f} -> "
        f"{last['rewards/margins']:.3f}, logps/chosen {first['logps/chosen']:.1f} -> {last['logps/chosen']:.1f}, "
        f"logps/rejected {first['logps/rejected']:.1f} -> {last['logps/rejected']:.1f} over {len(rows)} steps "
        f"({step_s[len(step_s) // 2]:.2f} s/step)")
  print(f"held-out rewards/accuracies {evals[0]['val_rewards/accuracies']:.2f} (step {evals[0]['step']}) -> "
        f"{evals[-1]['val_rewards/accuracies']:.2f} (step {evals[-1]['step']})")


def main() -> int:
  p = ArgParser(description="DPO on preference pairs")
  dpo.add_args(p)
  add_debug_flag(p)
  return run_cli(run, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
