"""Arguments shared by several subcommands: the model to load, sampling, training."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Callable

DEFAULT_MODEL_HELP = "model: a Hugging Face or Meta directory, a .gguf file or a llama2.c .bin"


def int_flag(lo: int = 1) -> Callable[[str], int]:
  """An argparse type: an integer of at least `lo` (a bad value is a one-line usage error naming the flag)."""
  def parse(text: str) -> int:
    try: v = int(text)
    except ValueError: raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < lo: raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
    return v
  return parse


def float_flag(lo: float = 0.0, above: bool = False, hi: float | None = None, below: bool = False) -> Callable[[str], float]:
  """An argparse type: a finite number >= lo (> lo with above=True), and <= hi (< hi with below=True)."""
  def parse(text: str) -> float:
    try: v = float(text)
    except ValueError: raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v): raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if v < lo or (above and v == lo):
      raise argparse.ArgumentTypeError(f"must be {'greater than' if above else 'at least'} {lo:g}, got {v:g}")
    if hi is not None and (v > hi or (below and v == hi)):
      raise argparse.ArgumentTypeError(f"must be {'less than' if below else 'at most'} {hi:g}, got {v:g}")
    return v
  return parse


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
  p.add_argument("--devices", help="split the model over these devices (tensor parallel), e.g. CPU:0,CPU:1 or "
                                   "CUDA:0,CUDA:1")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: as stored)")
  p.add_argument("--max-seq-len", type=int_flag(1), help="context length (default: the checkpoint's trained context)")
  p.add_argument("--rope-scaling", help="override RoPE scaling: TYPE:FACTOR (linear, dynamic, llama3, yarn) or JSON")
  p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization (Q8_0 / Q4_0 blocks of 32)")
  p.add_argument("--beam", type=int_flag(0), default=0, help="use decode kernels tuned by `tinyllama2 tune --beam N`")
  p.add_argument("--threads", type=int_flag(1), help="threads per CPU decode kernel (default: every core, at most 8)")


def _generation_flags() -> list:
  """GenerationConfig's fields that have a flag of their own (all but do_sample, which --temperature implies)."""
  from ..generate import GenerationConfig
  return [f for f in dataclasses.fields(GenerationConfig) if f.metadata.get("cli", {}).get("flag", True)]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
  """One flag per generation setting (--max-new-tokens, --temperature, ...), its default and help line from
  GenerationConfig."""
  for f in _generation_flags():
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    cli = dict(f.metadata["cli"])
    kw = {"default": default, "help": f.metadata["help"]}
    if default is not None and not {"action", "choices", "type"} & set(cli): kw["type"] = type(default)
    p.add_argument("--" + f.name.replace("_", "-"), **(kw | cli))


def sampling_kwargs(a: argparse.Namespace) -> dict:
  """The flags of add_sampling_args as generate() settings: --temperature 0 means greedy decoding."""
  if a.temperature < 0: raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
  kw = {f.name: getattr(a, f.name) for f in _generation_flags()}
  kw.update(do_sample=a.temperature > 0, temperature=a.temperature or 1.0, stop=a.stop or None,
            early_stopping={"true": True, "false": False, "never": "never"}[a.early_stopping])
  return kw


def load_model(a: argparse.Namespace):
  from ..devices import resolve_device
  from ..llama import Llama
  from ..runtime import cpu_threads
  devices = getattr(a, "devices", None)
  if devices is not None:   # devices that do not work here are an error before the weights are read
    from ..parallel import parse_devices
    if a.device: raise ValueError("pass --device or --devices, not both")
    devices = parse_devices(devices)
  else: resolve_device(a.device)
  if getattr(a, "threads", None) is not None: cpu_threads.set_threads(a.threads)
  llm = Llama.from_pretrained(a.model, tokenizer=a.tokenizer, device=a.device, devices=devices, dtype=a.dtype,
                              max_seq_len=a.max_seq_len, rope_scaling=parse_rope_scaling(a.rope_scaling),
                              quantize=getattr(a, "quantize", None), adapter=getattr(a, "adapter", None),
                              slots=getattr(a, "slots", None))
  llm.decoder.beam = getattr(a, "beam", 0)
  return llm


def add_train_args(p: argparse.ArgumentParser, steps: int, lr: float, batch: int, out_required: bool = True) -> None:
  p.add_argument("--max-steps", type=int_flag(1), default=steps, help="optimizer steps")
  p.add_argument("--lr", type=float_flag(0, above=True), default=lr, help="peak learning rate (after warmup)")
  p.add_argument("--min-lr", type=float_flag(0), help="final learning rate of the cosine schedule (default: lr/10)")
  p.add_argument("--warmup-steps", type=int_flag(0), help="linear warmup steps (default: 5%% of max-steps)")
  p.add_argument("--batch-size", type=int_flag(1), default=batch, help="rows per micro-batch")
  p.add_argument("--grad-accum", type=int_flag(1), default=1, help="micro-batches per optimizer step")
  p.add_argument("--seq-len", type=int_flag(1), default=256, help="tokens per row")
  p.add_argument("--weight-decay", type=float_flag(0), default=0.1, help="AdamW weight decay (not on norms)")
  p.add_argument("--grad-clip", type=float_flag(0), default=1.0, help="max gradient norm (0 = off)")
  p.add_argument("--eval-every", type=int_flag(1), default=100, help="held-out loss every N steps")
  p.add_argument("--save-every", type=int_flag(1), default=100, help="checkpoint every N steps")
  p.add_argument("--seed", type=int_flag(0), default=0, help="seed for init, data order and dropout")
  p.add_argument("--out", required=out_required, help="output folder (checkpoints, metrics, the trained model)")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  p.add_argument("--devices", help="data-parallel training over these devices, e.g. CPU:0,CPU:1: each batch split "
                                   "between them, the weights copied to each")


def train_config_kwargs(a: argparse.Namespace) -> dict:
  return dict(max_steps=a.max_steps, lr=a.lr, min_lr=a.min_lr if a.min_lr is not None else a.lr / 10,
              warmup_steps=a.warmup_steps if a.warmup_steps is not None else max(1, a.max_steps // 20),
              batch_size=a.batch_size, grad_accum=a.grad_accum, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
              eval_every=a.eval_every, save_every=a.save_every, seed=a.seed)


def load_callable(spec: str) -> Callable:
  """A Python function named as module:function or path/to/file.py:function (a --reward-fn)."""
  import importlib
  import importlib.util
  from pathlib import Path
  where, sep, name = spec.rpartition(":")
  if not sep or not where or not name: raise ValueError(f"--reward-fn {spec!r}: expected module:function or file.py:function")
  if where.endswith(".py") and not Path(where).is_file(): raise FileNotFoundError(f"--reward-fn: {where} not found")
  try:
    if where.endswith(".py"):
      loader = importlib.util.spec_from_file_location(Path(where).stem, where)
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else: module = importlib.import_module(where)
  except Exception as e: raise ValueError(f"--reward-fn {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
  fn = getattr(module, name, None)
  if not callable(fn): raise ValueError(f"--reward-fn {spec!r}: {where} has no function {name!r}")
  return fn


def add_rl_args(p: argparse.ArgumentParser, epochs: int) -> None:
  """The flags PPO and GRPO share: policy, prompts, rewards, sampling, updates."""
  p.add_argument("--model", required=True, help="the policy to start from (an SFT model): " + DEFAULT_MODEL_HELP)
  p.add_argument("--tokenizer", help="tokenizer.model path when it is not beside the weights")
  p.add_argument("--prompts", required=True, help="JSON / JSONL prompts: strings, or {\"prompt\": text or messages}")
  p.add_argument("--reward-model", help="a reward model directory (from `tinyllama2 rm`) scoring prompt + completion")
  p.add_argument("--reward-fn", action="append", default=[],
                 help="module:function or file.py:function, called as f(prompts, completions) -> rewards (repeatable; "
                      "added to the reward model's score)")
  p.add_argument("--template", choices=["llama2", "plain"], default="llama2", help="how message prompts are rendered")
  p.add_argument("--limit", type=int_flag(1), help="use only the first N prompts")
  p.add_argument("--lora-r", type=int_flag(1), default=8, help="LoRA rank of the policy")
  p.add_argument("--lora-alpha", type=float_flag(0, above=True), default=16.0, help="LoRA alpha (scale = alpha / r)")
  p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated HF module names to adapt")
  p.add_argument("--iterations", type=int_flag(1), default=20, help="rounds of sampling + updates")
  p.add_argument("--prompts-per-iteration", type=int_flag(1), default=8, help="prompts sampled each round")
  p.add_argument("--max-new-tokens", type=int_flag(1), default=32, help="completion length at most")
  p.add_argument("--temperature", type=float_flag(0, above=True), default=1.0, help="sampling temperature of rollouts")
  p.add_argument("--top-k", type=int_flag(0), default=0, help="top-k of rollouts (0 = off)")
  p.add_argument("--top-p", type=float_flag(0, above=True, hi=1), default=1.0, help="top-p of rollouts")
  p.add_argument("--epochs", type=int_flag(1), default=epochs, help="update passes over each round's completions")
  p.add_argument("--batch-size", type=int_flag(1), default=8, help="completions per minibatch update")
  p.add_argument("--lr", type=float_flag(0, above=True), default=1e-4, help="learning rate")
  p.add_argument("--min-lr", type=float_flag(0), help="final learning rate of the cosine schedule (default: lr/10)")
  p.add_argument("--grad-clip", type=float_flag(0), default=1.0, help="max gradient norm (0 = off)")
  p.add_argument("--seed", type=int_flag(0), default=0, help="seed for the adapter's init, prompt order and sampling")
  p.add_argument("--out", required=True, help="output folder (the adapter, metrics.jsonl)")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")


def rl_options(a: argparse.Namespace, cls: type, **extra):
  return cls(model=a.model, prompts=a.prompts, out=a.out, reward_model=a.reward_model,
             reward_fns=[load_callable(s) for s in a.reward_fn], tokenizer=a.tokenizer, template=a.template,
             lora_r=a.lora_r, lora_alpha=a.lora_alpha,
             target_modules=[m.strip() for m in a.target_modules.split(",") if m.strip()], iterations=a.iterations,
             prompts_per_iteration=a.prompts_per_iteration, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
             top_k=a.top_k, top_p=a.top_p, epochs=a.epochs, limit=a.limit, device=a.device,
             train=dict(batch_size=a.batch_size, lr=a.lr, min_lr=a.lr / 10 if a.min_lr is None else a.min_lr,
                        grad_clip=a.grad_clip, seed=a.seed), **extra)
