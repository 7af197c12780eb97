"""Vocabulary work: train a SentencePiece BPE vocabulary the way Llama's was trained, merge one vocabulary into
another (Chinese-LLaMA's recipe), and resize a model's embedding and output matrices to a new vocabulary."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

# Llama-2's tokenizer settings (read from its tokenizer.model's trainer_spec): byte fallback so no text is
# unknown, digits split one by one, no normalization, whitespace kept as is.
LLAMA_TRAINER_SETTINGS = dict(byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                              remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                              unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
                              max_sentence_length=16384, split_by_unicode_script=True, split_by_number=True)


def _check_inputs(inputs: Sequence[str | Path]) -> list[Path]:
  if not inputs: raise ValueError("no training text given (--input FILE ...)")
  paths = []
  for p in map(Path, inputs):
    if not p.is_file(): raise FileNotFoundError(f"training text not found: {p}")
    try:
      with open(p, encoding="utf-8") as f: head = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e: raise ValueError(f"{p}: cannot read it as UTF-8 text ({e})") from None
    if not head.strip(): raise ValueError(f"{p}: the file is empty")
    paths.append(p)
  return paths


def train_vocab(inputs: Sequence[str | Path], vocab_size: int, out_prefix: str | Path, model_type: str = "bpe",
                max_sentences: int = 2_000_000, verbose: bool = True, **overrides) -> Path:
  """Train a SentencePiece model on text files with Llama's settings; returns the path of OUT_PREFIX.model.

  Lines are the training sentences (sentencepiece's unit); long lines are split at max_sentence_length."""
  import sentencepiece as spm
  if model_type not in ("bpe", "unigram"): raise ValueError(f"model_type must be bpe or unigram, got {model_type!r}")
  n_special = 3 + 256   # unk/bos/eos + the byte-fallback pieces
  if vocab_size <= n_special: raise ValueError(f"vocab_size must exceed {n_special} (3 special + 256 byte pieces)")
  paths = _check_inputs(inputs)
  out_prefix = Path(out_prefix)
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  settings = {**LLAMA_TRAINER_SETTINGS, **overrides}
  # train into a temp prefix, then move: an interrupted run never leaves a half-written tokenizer behind
  with tempfile.TemporaryDirectory(dir=out_prefix.parent) as tmp:
    tmp_prefix = Path(tmp) / "vocab"
    try:
      spm.SentencePieceTrainer.train(input=",".join(map(str, paths)), model_prefix=str(tmp_prefix), vocab_size=vocab_size,
                                     model_type=model_type, input_sentence_size=max_sentences, shuffle_input_sentence=True,
                                     minloglevel=0 if verbose else 2, num_threads=os.cpu_count() or 1, **settings)
    except RuntimeError as e:
      raise ValueError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: {str(e).splitlines()[0]}") from None
    for ext in (".model", ".vocab"): os.replace(f"{tmp_prefix}{ext}", f"{out_prefix}{ext}")
  return Path(f"{out_prefix}.model")
