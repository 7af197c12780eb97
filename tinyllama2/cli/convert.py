"""`tinyllama2 convert`: any checkpoint we read to HF, GGUF or Meta; never over an existing output unless --force."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "convert a checkpoint to another format"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="source model (HF or Meta directory, .gguf or llama2.c .bin)")
  p.add_argument("--to", choices=["hf", "gguf", "meta"], required=True, help="target format")
  p.add_argument("out", help="output folder (hf, meta) or file (gguf)")
  p.add_argument("--tokenizer", help="tokenizer.model to include")
  p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default="f32",
                 help="stored dtype (bf16: hf only; q8_0, q4_0: gguf only)")
  p.add_argument("--force", action="store_true", help="write into an existing non-empty folder")


def _check_dtype(to: str, dtype: str) -> None:
  if to == "hf" and dtype in ("q8_0", "q4_0"):
    raise ValueError(f"--dtype {dtype} is for --to gguf; HF export takes f32, f16 or bf16")
  if to == "meta" and dtype != "f32": raise ValueError("Meta export writes f32; drop --dtype")
  if to == "gguf" and dtype == "bf16": raise ValueError("GGUF export takes --dtype f32, f16, q8_0 or q4_0")


def check_vocab(tokenizer, vocab_size: int) -> None:
  """A tokenizer written beside weights must have one piece per vocabulary row, or the result will not load (GGUF:
  llama.cpp needs as many tokens as rows) or decode ids to the wrong text."""
  if tokenizer is not None and tokenizer.vocab_size != vocab_size:
    raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary has "
                     f"{vocab_size} rows; pass the model's own --tokenizer (or grow the model with tinyllama2 vocab resize)")


def main(a: argparse.Namespace) -> None:
  from ..checkpoint import gguf, hf, load_checkpoint, meta
  from ..fileio import check_out_dir, check_out_file, write_dir
  from ..tokenizer import Tokenizer
  _check_dtype(a.to, a.dtype)
  out = check_out_file(a.out, "output", a.force) if a.to == "gguf" else check_out_dir(a.out, "output", a.force)
  given = Tokenizer(a.tokenizer) if a.tokenizer else None   # a missing or broken --tokenizer fails before any work
  ckpt = load_checkpoint(a.src)
  tokenizer = given or (Tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None)
  if tokenizer is None and ckpt.tokenizer_proto and a.to == "gguf":   # a GGUF's own vocabulary goes along
    tokenizer = Tokenizer.from_proto(ckpt.tokenizer_proto, a.src)
  check_vocab(tokenizer, ckpt.args.vocab_size)
  tok = Path(a.tokenizer) if a.tokenizer else ckpt.tokenizer_path   # a tokenizer.model file to copy (hf, meta)
  if a.to == "hf":
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype]
    write_dir(out, lambda d: hf.save(d, ckpt.args, ckpt.float_weights(), tokenizer_model=tok, dtype=dtype))
  elif a.to == "meta":
    def save_meta(d: Path) -> None:
      meta.save(d, ckpt.args, ckpt.float_weights())
      if tok: shutil.copyfile(tok, d / "tokenizer.model")
    write_dir(out, save_meta)
  else: gguf.save(out, ckpt.args, ckpt.float_weights(), tokenizer=tokenizer, dtype=a.dtype)
  print(f"wrote {a.to} model to {out}")
