"""`tinyllama2` command line: chat, generate, convert, bench. User errors print one line and exit non-zero."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL_HELP = "model: a Hugging Face or Meta directory, a .gguf file or a llama2.c .bin"


def parse_rope_scaling(text: str | None) -> dict | None:
  """'linear:2', 'dynamic:4' or a JSON object as in config.json."""
  if text is None: return None
  if text.lstrip().startswith("{"):
    try: return json.loads(text)
    except json.JSONDecodeError as e: raise ValueError(f"--rope-scaling: invalid JSON ({e})") from None
  kind, _, factor = text.partition(":")
  try: return {"type": kind, "factor": float(factor)}
  except ValueError: raise ValueError(f"--rope-scaling: expected TYPE:FACTOR (e.g. linear:2) or JSON, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
  p.add_argument("--model", required=required, help=DEFAULT_MODEL_HELP)
  p.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to apply")
  p.add_argument("--device", help="tinygrad device, e.g. CPU, CL, CUDA, METAL (default: $DEV, else CPU)")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: as stored)")
  p.add_argument("--max-seq-len", type=int, help="context length (default: the checkpoint's trained context)")
  p.add_argument("--rope-scaling", help="override RoPE scaling: TYPE:FACTOR (linear, dynamic, llama3, yarn) or JSON")
  p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization (Q8_0 / Q4_0 blocks of 32)")
  p.add_argument("--beam", type=int, default=0, help="use decode kernels tuned by `tinyllama2 tune --beam N`")
  p.add_argument("--threads", type=int, help="threads per CPU decode kernel (default: every core, at most 8)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="sampling temperature; 0 means greedy decoding (CLI only: the API raises instead)")
  p.add_argument("--top-k", type=int, default=50, help="keep the k most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set with this mass")
  p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × the top probability")
  p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for tokens already seen (HF meaning)")
  p.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling mass (1 = off)")
  p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (0 = off)")
  p.add_argument("--min-new-tokens", type=int, default=0, help="suppress eos until this many new tokens")
  p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style: logit -= count × this")
  p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style: logit -= this if the token appeared")
  p.add_argument("--penalty-last-n", type=int, default=64, help="window of the two penalties above (-1 = everything)")
  p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = off)")
  p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob sum / length ** this")
  p.add_argument("--early-stopping", choices=["true", "false", "never"], default="false", help="beam search stop rule (HF)")
  p.add_argument("--num-return-sequences", type=int, default=1, help="sequences to return (generate --json)")
  p.add_argument("--eos-token-id", type=int, action="append", help="end-of-sequence id (repeatable; default: the model's)")
  p.add_argument("--seed", type=int, help="random seed for sampling")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_kwargs(a: argparse.Namespace) -> dict:
  early = {"true": True, "false": False, "never": "never"}[a.early_stopping]
  return dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0, temperature=a.temperature or 1.0,
              top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
              stop=a.stop or None, typical_p=a.typical_p, no_repeat_ngram_size=a.no_repeat_ngram_size,
              min_new_tokens=a.min_new_tokens, frequency_penalty=a.frequency_penalty, presence_penalty=a.presence_penalty,
              penalty_last_n=a.penalty_last_n, num_beams=a.num_beams, length_penalty=a.length_penalty,
              early_stopping=early, eos_token_id=a.eos_token_id)


def load_model(a: argparse.Namespace):
  from . import cpu_threads
  from .llama import Llama
  if getattr(a, "threads", None) is not None: cpu_threads.set_threads(a.threads)
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype,
                              max_seq_len=a.max_seq_len, rope_scaling=parse_rope_scaling(a.rope_scaling),
                              quantize=getattr(a, "quantize", None), adapter=getattr(a, "adapter", None))
  llm.decoder.beam = getattr(a, "beam", 0)
  return llm


def is_chat_model(path: str) -> bool:
  """Llama-2 chat checkpoints are named *-chat*; others are treated as base models that continue text."""
  p = Path(path)
  cfg = p / "tokenizer_config.json"
  if cfg.is_file():
    try:
      if "chat_template" in json.loads(cfg.read_text()): return True
    except (json.JSONDecodeError, UnicodeDecodeError): pass
  return any(w in p.name.lower() for w in ("chat", "instruct"))


def chat_loop(llm, system: str | None, template: str, prompt: str | None, gen_kwargs: dict, model_path: str) -> None:
  from .tokenizer import Llama2ChatTemplate, PlainTemplate
  use_chat = template == "llama2" or (template == "auto" and is_chat_model(model_path))
  llm.chat_template = Llama2ChatTemplate() if use_chat else PlainTemplate()
  messages: list[dict] = [{"role": "system", "content": system}] if system and use_chat else []
  transcript = system + "\n" if system and not use_chat else ""
  interactive = prompt is None
  if interactive: print(f"tinyllama2 chat ({'chat format' if use_chat else 'text continuation'}); Ctrl-D to quit")
  while True:
    if interactive:
      try: user = input("> ")
      except (EOFError, KeyboardInterrupt):
        print()
        return
      if not user.strip(): continue
    else: user = prompt
    if use_chat:
      messages.append({"role": "user", "content": user})
      stream = llm.chat(messages, stream=True, **gen_kwargs)
    else:
      transcript += user
      stream = llm.generate(transcript, stream=True, **gen_kwargs)
      if not interactive: print(user, end="", flush=True)
    for piece in stream: print(piece, end="", flush=True)
    print()
    answer = stream.generation.text
    if use_chat: messages.append({"role": "assistant", "content": answer})
    else: transcript += answer + "\n"
    if not interactive: return


def cmd_generate(a: argparse.Namespace) -> None:
  llm = load_model(a)
  kw = sampling_kwargs(a)
  if a.json or a.num_beams > 1 or a.num_return_sequences > 1:
    gens = llm.generate(a.prompt, num_return_sequences=a.num_return_sequences, **kw)
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


def cmd_chat(a: argparse.Namespace) -> None:
  chat_loop(load_model(a), a.system, a.template, a.prompt, sampling_kwargs(a), a.model)


def cmd_convert(a: argparse.Namespace) -> None:
  from .checkpoint import gguf, hf, load_checkpoint, meta
  from .tokenizer import Tokenizer
  out = Path(a.out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.force:
    raise ValueError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}; choose another path or pass --force")
  ckpt = load_checkpoint(a.src)
  tok = a.tokenizer or ckpt.tokenizer_path
  if a.to == "hf":
    if a.dtype in ("q8_0", "q4_0"): raise ValueError(f"--dtype {a.dtype} is for --to gguf; HF export takes f32, f16 or bf16")
    dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype]
    hf.save(out, ckpt.args, ckpt.float_weights(), tokenizer_model=tok, dtype=dtype)
  elif a.to == "meta":
    if a.dtype != "f32": raise ValueError("Meta export writes f32; drop --dtype")
    meta.save(out, ckpt.args, ckpt.float_weights())
    if tok: shutil.copyfile(tok, out / "tokenizer.model")
  else:
    if a.dtype == "bf16": raise ValueError("GGUF export takes --dtype f32, f16, q8_0 or q4_0")
    tokenizer = Tokenizer(tok) if tok else (Tokenizer.from_proto(ckpt.tokenizer_proto, a.src) if ckpt.tokenizer_proto else None)
    gguf.save(out, ckpt.args, ckpt.float_weights(), tokenizer=tokenizer, dtype=a.dtype)
  print(f"wrote {a.to} model to {out}")


def cmd_bench(a: argparse.Namespace) -> None:
  from .benchmark import main as bench_main
  bench_main(a)


def cmd_tune(a: argparse.Namespace) -> None:
  from .benchmark import tune
  for dtype in a.dtype or ["float32"]:
    tune(a.model, a.device, dtype, a.quantize, a.beam, a.tokenizer)
  print(f"tuned the decode kernels with BEAM={a.beam}; pass --beam {a.beam} to use them")


def add_train_args(p: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
  p.add_argument("--max-steps", type=int, default=steps, help="optimizer steps")
  p.add_argument("--lr", type=float, default=lr, help="peak learning rate (after warmup)")
  p.add_argument("--min-lr", type=float, help="final learning rate of the cosine schedule (default: lr/10)")
  p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 5%% of max-steps)")
  p.add_argument("--batch-size", type=int, default=batch, help="rows per micro-batch")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
  p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
  p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on norms)")
  p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
  p.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps")
  p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
  p.add_argument("--seed", type=int, default=0, help="seed for init, data order and dropout")
  p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, the trained model)")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")


def train_config_kwargs(a: argparse.Namespace) -> dict:
  return dict(max_steps=a.max_steps, lr=a.lr, min_lr=a.min_lr if a.min_lr is not None else a.lr / 10,
              warmup_steps=a.warmup_steps if a.warmup_steps is not None else max(1, a.max_steps // 20),
              batch_size=a.batch_size, grad_accum=a.grad_accum, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
              eval_every=a.eval_every, save_every=a.save_every, seed=a.seed)


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data", nargs="+", required=True, help="plain-text corpus file(s)")
  p.add_argument("--config", help="a preset shape (e.g. stories15M) instead of the size flags")
  p.add_argument("--dim", type=int, default=128, help="model width")
  p.add_argument("--n-layers", type=int, default=6, help="transformer blocks")
  p.add_argument("--n-heads", type=int, default=4, help="attention heads")
  p.add_argument("--n-kv-heads", type=int, default=2, help="key/value heads (GQA)")
  p.add_argument("--vocab-size", type=int, default=512, help="size of the tokenizer trained on --data")
  p.add_argument("--tokenizer", help="use this tokenizer.model instead of training one")
  add_train_args(p, steps=1000, lr=2e-3, batch=16)


def pretrain_options(a: argparse.Namespace):
  from .train.recipes import PretrainOptions
  return PretrainOptions(data=a.data, out=a.out, preset=a.config, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                         n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, tokenizer=a.tokenizer, seq_len=a.seq_len,
                         device=a.device, resume=a.resume, train=train_config_kwargs(a))


def add_finetune_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
  p.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  p.add_argument("--data", required=True, help="Alpaca / ShareGPT JSON (or JSONL), or a plain-text file")
  p.add_argument("--format", choices=["auto", "alpaca", "sharegpt", "text"], default="auto", help="data format")
  p.add_argument("--template", choices=["llama2", "plain"], default="llama2", help="how dialogues are rendered")
  p.add_argument("--limit", type=int, help="use only the first N records")
  p.add_argument("--full", action="store_true", help="train the weights themselves instead of a LoRA adapter")
  p.add_argument("--freeze", action="append", default=[], help="with --full: freeze weights matching this glob")
  p.add_argument("--freeze-layers", type=int, default=0, help="with --full: freeze the embeddings and first N blocks")
  p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
  p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale = alpha / r)")
  p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
  p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated HF module names to adapt")
  add_train_args(p, steps=200, lr=1e-3, batch=8)


def finetune_options(a: argparse.Namespace):
  from .train.recipes import FinetuneOptions
  if (a.freeze or a.freeze_layers) and not a.full: raise ValueError("--freeze / --freeze-layers need --full")
  return FinetuneOptions(model=a.model, data=a.data, out=a.out, format=a.format, tokenizer=a.tokenizer,
                         template=a.template, lora=not a.full, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                         lora_dropout=a.lora_dropout, target_modules=[m.strip() for m in a.target_modules.split(",") if m.strip()],
                         freeze=a.freeze, freeze_layers=a.freeze_layers, seq_len=a.seq_len, limit=a.limit,
                         device=a.device, resume=a.resume, train=train_config_kwargs(a))


def cmd_pretrain(a: argparse.Namespace) -> None:
  from .train.recipes import pretrain
  pretrain(pretrain_options(a))


def cmd_finetune(a: argparse.Namespace) -> None:
  from .train.recipes import finetune
  finetune(finetune_options(a))


def cmd_merge(a: argparse.Namespace) -> None:
  from .llama import Llama
  from .train.recipes import export_hf
  out = Path(a.out)
  if out.exists() and any(out.iterdir()): raise ValueError(f"{out} already exists and is not empty; choose another --out")
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, adapter=a.adapter, dtype="float32")
  export_hf(llm.model, out, llm._tokenizer)
  print(f"wrote the merged model to {out}")


def cmd_vocab(a: argparse.Namespace) -> None:
  from . import vocab
  if a.vocab_command == "train":
    path = vocab.train_vocab(a.input, a.vocab_size, a.out, model_type=a.model_type, verbose=not a.quiet)
    print(f"wrote {path}")
  elif a.vocab_command == "merge":
    n_base, n_merged = vocab.merge_vocab(a.base, a.add, a.out)
    print(f"wrote {a.out}: {n_base} + {n_merged - n_base} new pieces = {n_merged}")
  else:
    n = vocab.resize_model(a.model, a.tokenizer, a.out)
    print(f"wrote {a.out} with a vocabulary of {n}")


def add_vocab_parser(sub) -> None:
  v = sub.add_parser("vocab", help="train, merge and resize vocabularies")
  vs = v.add_subparsers(dest="vocab_command", required=True)
  t = vs.add_parser("train", help="train a SentencePiece vocabulary with Llama's settings")
  t.add_argument("--input", nargs="+", required=True, help="UTF-8 text file(s)")
  t.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
  t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece model type")
  t.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
  t.add_argument("--quiet", action="store_true", help="hide sentencepiece's progress log")
  m = vs.add_parser("merge", help="append the pieces of ADD that BASE lacks")
  m.add_argument("base", help="the tokenizer.model to extend")
  m.add_argument("add", help="the tokenizer.model whose new pieces are appended")
  m.add_argument("--out", required=True, help="merged tokenizer.model")
  r = vs.add_parser("resize", help="grow a model's embeddings and output to a tokenizer's size")
  r.add_argument("model", help=DEFAULT_MODEL_HELP)
  r.add_argument("--tokenizer", required=True, help="the (merged) tokenizer.model")
  r.add_argument("--out", required=True, help="output Hugging Face directory")
  v.set_defaults(fn=cmd_vocab)


def build_parser() -> argparse.ArgumentParser:
  from .benchmark import add_bench_args
  p = argparse.ArgumentParser(prog="tinyllama2", description="Llama-2 on tinygrad")
  sub = p.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="continue a prompt")
  add_model_args(g)
  add_sampling_args(g)
  g.add_argument("--prompt", required=True, help="the text to continue")
  g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
  g.set_defaults(fn=cmd_generate)
  c = sub.add_parser("chat", help="interactive chat (or one answer with --prompt)")
  add_model_args(c)
  add_sampling_args(c)
  c.add_argument("--system", help="system prompt")
  c.add_argument("--prompt", help="answer this one message and exit")
  c.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto",
                 help="chat format: llama2 [INST] format, plain continuation, or auto (by model name)")
  c.set_defaults(fn=cmd_chat)
  v = sub.add_parser("convert", help="convert a checkpoint to another format")
  v.add_argument("src", help="source model (HF or Meta directory, .gguf or llama2.c .bin)")
  v.add_argument("--to", choices=["hf", "gguf", "meta"], required=True, help="target format")
  v.add_argument("out", help="output folder (hf, meta) or file (gguf)")
  v.add_argument("--tokenizer", help="tokenizer.model to include")
  v.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default="f32",
                 help="stored dtype (bf16: hf only; q8_0, q4_0: gguf only)")
  v.add_argument("--force", action="store_true", help="write into an existing non-empty folder")
  v.set_defaults(fn=cmd_convert)
  b = sub.add_parser("bench", help="prefill/decode speed, first-token latency, memory")
  add_bench_args(b)
  b.set_defaults(fn=cmd_bench)
  t = sub.add_parser("tune", help="BEAM-search the decode kernels once (slow); later runs use --beam to reuse them")
  t.add_argument("--model", required=True, help="model path or a random-weight shape (e.g. llama2-7b)")
  t.add_argument("--tokenizer", help="tokenizer.model (not needed)")
  t.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  t.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"], help="dtype(s) to tune")
  t.add_argument("--quantize", choices=["int8", "int4"], help="tune the quantized kernels")
  t.add_argument("--beam", type=int, default=2, help="BEAM width")
  t.set_defaults(fn=cmd_tune)
  pt = sub.add_parser("pretrain", help="train a tokenizer and a Llama from scratch on text")
  add_pretrain_args(pt)
  pt.set_defaults(fn=cmd_pretrain)
  ft = sub.add_parser("finetune", help="LoRA or full supervised fine-tuning")
  add_finetune_args(ft)
  ft.set_defaults(fn=cmd_finetune)
  m = sub.add_parser("merge", help="fold a LoRA adapter into its base model and write a Hugging Face directory")
  m.add_argument("--model", required=True, help=DEFAULT_MODEL_HELP)
  m.add_argument("--adapter", required=True, help="PEFT-format LoRA adapter directory")
  m.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  m.add_argument("--out", required=True, help="output folder")
  m.set_defaults(fn=cmd_merge)
  add_vocab_parser(sub)
  return p


def run_cli(fn, a: argparse.Namespace) -> int:
  try: fn(a)
  except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130
  return 0


def main(argv: list[str] | None = None) -> int:
  a = build_parser().parse_args(argv)
  return run_cli(a.fn, a)


if __name__ == "__main__":
  sys.exit(main())
