"""LoRA supervised fine-tuning on Alpaca-format data, then one answer from the tuned model.

  python examples/finetune_lora.py --model ../shared/models/stories260K.bin --tokenizer ../shared/tokenizers/tok512.model \
      --data ../shared/instruct/alpaca_en_demo.json --limit 200 --seq-len 128 --max-steps 60 --out runs/lora \
      --prompt "Give three tips for staying healthy."
The adapter lands in OUT/adapter (PEFT format): use it with `--adapter OUT/adapter`, or fold it into the base
model with `tinyllama2 merge --model MODEL --adapter OUT/adapter --out MERGED`.
"""
import argparse
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, run_cli
from tinyllama2.cli.finetune import add_args as add_finetune_args, finetune_options


def run(a: argparse.Namespace) -> None:
  from pathlib import Path

  from tinyllama2 import Llama, PlainTemplate
  from tinyllama2.train.recipes import finetune
  finetune(finetune_options(a))
  if a.full: llm = Llama.from_pretrained(Path(a.out) / "model")
  else: llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, adapter=Path(a.out) / "adapter")
  if a.template == "plain": llm.chat_template = PlainTemplate()
  print(f"\n> {a.prompt}")
  for piece in llm.chat([{"role": "user", "content": a.prompt}], max_new_tokens=a.max_new_tokens, stream=True):
    print(piece, end="", flush=True)
  print()


def main() -> int:
  p = ArgParser(description="LoRA fine-tuning on instruction data, then chat with the result")
  add_finetune_args(p)
  p.add_argument("--prompt", default="Give three tips for staying healthy.", help="ask the tuned model this")
  p.add_argument("--max-new-tokens", type=int, default=64, help="length of the answer")
  add_debug_flag(p)
  return run_cli(run, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
