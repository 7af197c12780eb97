"""`tinyllama2 generate`: continue one prompt, streamed, or as JSON with tokens and timings."""
from __future__ import annotations

import argparse
import json

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs

HELP = "continue a prompt"


def add_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p)
  add_sampling_args(p)
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")


def main(a: argparse.Namespace) -> None:
  from ..generate import GenerationConfig
  from ..tokenizer import check_utf8
  check_utf8(a.prompt, "--prompt")
  kw = sampling_kwargs(a)
  GenerationConfig.of(**kw)   # bad settings fail before the model loads
  llm = load_model(a)
  if a.json or a.num_beams > 1 or a.num_return_sequences > 1:
    gens = llm.generate(a.prompt, **kw)
    gens = gens if isinstance(gens, list) else [gens]
    if not a.json:
      for g in gens: print(g.text)
      return
    rows = [{"text": g.text, "tokens": g.tokens, "prompt_tokens": g.prompt_tokens, "finish_reason": g.finish_reason,
             "prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s,
             "time_to_first_token_s": g.time_to_first_token_s, **({"score": g.score} if g.score is not None else {})}
            for g in gens]
    print(json.dumps(rows[0] if len(rows) == 1 else rows))
    return
  for piece in llm.generate(a.prompt, stream=True, **kw): print(piece, end="", flush=True)
  print()
