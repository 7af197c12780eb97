"""Extend Llama's tokenizer with Chinese pieces, as Chinese-LLaMA does, and measure what it gains.

  python examples/train_tokenizer.py --corpus ../shared/corpora/hongloumeng_zh.txt \
      --base ../shared/tokenizers/llama2_tokenizer.model --english ../shared/corpora/tinyshakespeare_input.txt \
      --out runs/zh_vocab
Trains a BPE vocabulary on the first 90% of the corpus, merges its new pieces into the base tokenizer and reports
tokens per character on the held-out 10% and on English text (which must tokenize exactly as before).
Grow a model to the merged vocabulary with: tinyllama2 vocab resize MODEL --tokenizer OUT/merged.model --out DIR
"""
import argparse
import sys
from pathlib import Path

from tinyllama2.cli import ArgParser, add_debug_flag, run_cli
from tinyllama2.tokenizer import Tokenizer
from tinyllama2.vocab import merge_vocab, train_vocab


def run(a: argparse.Namespace) -> None:
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  text = Path(a.corpus).read_text(encoding="utf-8")
  cut = int(len(text) * 0.9)
  (out / "train.txt").write_text(text[:cut], encoding="utf-8")
  held_out = text[cut:]
  added = train_vocab([out / "train.txt"], a.vocab_size, out / "zh", verbose=False)
  n_base, n_merged = merge_vocab(a.base, added, out / "merged.model")
  base, merged = Tokenizer(a.base), Tokenizer(out / "merged.model")
  print(f"vocabulary: {n_base} -> {n_merged} pieces (+{n_merged - n_base} from the {a.vocab_size}-piece Chinese model)")
  before, after = len(base.encode(held_out, bos=False)), len(merged.encode(held_out, bos=False))
  print(f"held-out Chinese ({len(held_out):,} chars): {before / len(held_out):.3f} -> {after / len(held_out):.3f} "
        f"tokens/char ({after / before:.2f}x the tokens)")
  if a.english:
    en = Path(a.english).read_text(encoding="utf-8")
    same = base.encode(en) == merged.encode(en)
    print(f"English ({len(en):,} chars): {len(base.encode(en, bos=False)) / len(en):.3f} tokens/char, "
          f"{'identical' if same else 'DIFFERENT'} ids with the merged tokenizer")


def main() -> int:
  p = ArgParser(description="train a Chinese BPE vocabulary and merge it into Llama's tokenizer")
  p.add_argument("--corpus", required=True, help="Chinese text (the last 10%% is held out)")
  p.add_argument("--base", required=True, help="the tokenizer.model to extend (Llama-2's)")
  p.add_argument("--english", help="English text that must tokenize unchanged")
  p.add_argument("--vocab-size", type=int, default=8000, help="size of the Chinese vocabulary to train")
  p.add_argument("--out", required=True, help="output folder (zh.model, merged.model)")
  add_debug_flag(p)
  return run_cli(run, p.parse_args())


if __name__ == "__main__":
  sys.exit(main())
