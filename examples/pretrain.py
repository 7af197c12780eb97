"""Train a SentencePiece BPE tokenizer on a corpus, then a small Llama from scratch on it.

  python examples/pretrain.py --data ../shared/corpora/tinystories_train_first2MiB.txt --out runs/stories \
      --max-steps 300
The model lands in OUT/model (a Hugging Face directory): python examples/chat.py --model OUT/model
"""
import sys

from tinyllama2.cli import ArgParser, add_debug_flag, run_cli
from tinyllama2.cli.pretrain import add_args as add_pretrain_args, pretrain_options
from tinyllama2.train.recipes import pretrain


def main() -> int:
  p = ArgParser(description="train a tokenizer and a small Llama from scratch")
  add_pretrain_args(p)
  add_debug_flag(p)
  a = p.parse_args()
  return run_cli(lambda a: pretrain(pretrain_options(a)), a)


if __name__ == "__main__":
  sys.exit(main())
