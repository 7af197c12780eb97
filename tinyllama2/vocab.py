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


def merge_vocab(base: str | Path, add: str | Path, out: str | Path) -> tuple[int, int]:
  """Append every normal piece of ADD that BASE lacks, in ADD's order; BASE's pieces, ids and scores stay as they
  are. Returns (base size, merged size).

  New pieces get scores below all of BASE's (keeping ADD's relative order), so in BPE merging BASE's merges keep
  their priority and text BASE already tokenized well keeps its tokens."""
  import sentencepiece as spm

  from .fileio import atomic_write
  from .spm_proto import NORMAL, Piece, encode_field, fields, parse_model, serialize_model
  base, add, out = Path(base), Path(add), Path(out)
  for p in (base, add):
    if not p.is_file(): raise FileNotFoundError(f"tokenizer not found: {p}")
  parsed = []
  for p in (base, add):
    try: parsed.append(parse_model(p.read_bytes()))
    except (ValueError, UnicodeDecodeError) as e: raise ValueError(f"{p}: not a SentencePiece model ({e})") from None
  (base_pieces, base_rest), (add_pieces, _) = parsed
  if not base_pieces: raise ValueError(f"{base}: holds no pieces; is it a SentencePiece .model file?")
  have = {p.piece for p in base_pieces}
  lowest = min(p.score for p in base_pieces)
  new = [p for p in add_pieces if p.type == NORMAL and p.piece not in have]
  merged = base_pieces + [Piece(p.piece, lowest - 1 - k, NORMAL) for k, p in enumerate(new)]
  rest = []
  for num, wire, val in base_rest:   # TrainerSpec.vocab_size (field 4) follows the new size
    if num == 2 and wire == 2:
      val = b"".join(encode_field(n, w, len(merged) if n == 4 else v) for n, w, v in fields(val))
    rest.append((num, wire, val))
  data = serialize_model(merged, rest)
  check = spm.SentencePieceProcessor()
  check.LoadFromSerializedProto(data)   # sentencepiece itself must accept it before it is written
  if check.vocab_size() != len(merged): raise ValueError("merged model failed to load with the expected size")
  if out.resolve() in (base.resolve(), add.resolve()): raise ValueError(f"--out {out} would overwrite an input tokenizer")
  with atomic_write(out) as f: f.write(data)
  return len(base_pieces), len(merged)


def resize_embeddings(weights: dict, new_vocab: int, tie_embeddings: bool) -> dict:
  """Grow tok_embeddings (and output) to new_vocab rows; new rows are the mean of the old rows.

  The mean keeps a new token's embedding inside the distribution the model has seen, and as an output row it
  gives new tokens the average logit rather than a random one (as Chinese-LLaMA and HF's resize_token_embeddings
  with mean init do); old rows are untouched, so old-vocabulary text gets exactly the old logits."""
  import numpy as np
  out = dict(weights)
  for name in ("tok_embeddings.weight",) + (() if tie_embeddings else ("output.weight",)):
    w = np.asarray(weights[name], dtype=np.float32)
    if new_vocab < w.shape[0]: raise ValueError(f"the tokenizer has {new_vocab} pieces, fewer than the model's {w.shape[0]} rows")
    extra = np.repeat(w.mean(0, keepdims=True), new_vocab - w.shape[0], axis=0)
    out[name] = np.concatenate([w, extra], 0)
  return out


def resize_model(model: str | Path, tokenizer: str | Path, out: str | Path, force: bool = False) -> int:
  """Write MODEL (any format) with its vocabulary grown to TOKENIZER's size as a Hugging Face directory."""
  from .checkpoint import hf, load_checkpoint
  from .fileio import check_out_dir, write_dir
  from .tokenizer import Tokenizer
  out = check_out_dir(out, "--out", force)
  n = Tokenizer(tokenizer).vocab_size   # a missing or broken tokenizer fails before the model is read
  ckpt = load_checkpoint(model)
  if n < ckpt.args.vocab_size:
    raise ValueError(f"tokenizer {tokenizer} has {n} pieces, fewer than the model's {ckpt.args.vocab_size} rows; "
                     "resize only grows a vocabulary")
  weights = resize_embeddings(ckpt.float_weights(), n, ckpt.args.tie_embeddings)
  write_dir(out, lambda d: hf.save(d, ckpt.args.replace(vocab_size=n), weights, tokenizer_model=tokenizer))
  return n
