"""`tinyllama2 chat`: an interactive session, or one answer with --prompt. Base models continue the transcript."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs

HELP = "interactive chat (or one answer with --prompt)"


def add_args(p: argparse.ArgumentParser) -> None:
  add_model_args(p)
  add_sampling_args(p)
  p.add_argument("--system", help="system prompt")
  p.add_argument("--prompt", help="answer this one message and exit")
  p.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto",
                 help="chat format: llama2 [INST] format, plain continuation, or auto (by model name)")


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
  from ..tokenizer import Llama2ChatTemplate, PlainTemplate
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


def main(a: argparse.Namespace) -> None:
  chat_loop(load_model(a), a.system, a.template, a.prompt, sampling_kwargs(a), a.model)
