"""Train a reward model on preference pairs, then print how its accuracy moved and score the held-out answers.

  python examples/reward_model.py --model tinyllama2/default_model --data ../shared/preference/dpo_en_demo.json \
      --seq-len 256 --max-steps 60 --batch-size 4 --out runs/rm
The reward model lands in OUT/model, a Hugging Face LlamaForSequenceClassification directory
(transformers loads it as it is); score texts with `tinyllama2 rm score --model OUT/model --text "..."`.
"""
import argparse
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, rm, run_cli


def run(a: argparse.Namespace) -> None:
  from pathlib import Path

  from tinyllama2.train.trainer import read_metrics
  rm.main(a)
  rows = read_metrics(Path(a.out) / "metrics.jsonl")
  evals = [r for r in rows if "val_accuracy" in r]
  step_s = sorted(a.batch_size * a.grad_accum * 2 * (a.seq_len + 1) / r["tokens_per_s"] for r in rows[2:] or rows)
  print(f"train loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, accuracy {rows[0]['accuracy']:.2f} -> "
        f"{rows[-1]['accuracy']:.2f} over {len(rows)} steps ({step_s[len(step_s) // 2]:.2f} s/step)")
  print(f"held-out accuracy (chosen scored above rejected): {evals[-1]['val_accuracy']:.2f} at step {evals[-1]['step']}")


def main() -> int:
  p = ArgParser(description="train a reward model on preference pairs")
  rm.add_args(p)
  add_debug_flag(p)
  return run_cli(run, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
