"""`tinyllama2 chat`: an interactive session, or one answer with --prompt. Base models continue the transcript.
The model's cache keeps the conversation, so each turn prefills only what is new."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
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
  add_ctx_policy_arg(p)


def add_ctx_policy_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ctx-policy", choices=["truncate-oldest", "error"], default="truncate-oldest",
                 help="when the conversation outgrows the context: drop the oldest turns (and cut a message too long "
                      "on its own to its end), or refuse such a message")


def is_chat_model(path: str) -> bool:
  """Llama-2 chat checkpoints are named *-chat*; others are treated as base models that continue text."""
  p = Path(path)
  cfg = p / "tokenizer_config.json"
  if cfg.is_file():
    try:
      if "chat_template" in json.loads(cfg.read_text()): return True
    except (json.JSONDecodeError, UnicodeDecodeError): pass
  return any(w in p.name.lower() for w in ("chat", "instruct"))


def read_line(prompt: str) -> str:
  """One line from the terminal; bytes that are not UTF-8 are an error naming them, not a failure in the tokenizer."""
  from ..tokenizer import check_utf8
  try: line = input(prompt)
  except UnicodeDecodeError as e:
    raise ValueError(f"the input line is not valid UTF-8 (byte 0x{e.object[e.start]:02x}); type or pipe UTF-8 text") from None
  check_utf8(line, "the input line")
  return line


def check_chat_args(system: str | None, prompt: str | None, gen_kwargs: dict) -> None:
  """What can be checked before the model loads: text flags are UTF-8, generation settings are valid."""
  from ..generate import GenerationConfig
  from ..tokenizer import check_utf8
  if system is not None: check_utf8(system, "--system")
  if prompt is not None: check_utf8(prompt, "--prompt")
  GenerationConfig.of(**gen_kwargs)


class Conversation:
  """The turns of a chat and the prompt they make, kept within the context: when a prompt (plus room for an answer)
  would not fit, the oldest whole turns after the system prompt are dropped; a message too long on its own is cut to
  its end (policy "truncate-oldest") or refused (policy "error"). Chat models get their template; base models
  continue the transcript, each answer followed by a newline."""

  def __init__(self, llm, system: str | None, use_chat: bool, policy: str, answer_room: int):
    self.llm, self.system, self.use_chat, self.policy = llm, system, use_chat, policy
    self.room = min(answer_room, llm.model.max_seq_len // 4)   # tokens kept free for the answer
    self.turns: list[tuple[str, str]] = []                      # finished (user, answer) turns
    self.dropped = 0

  def _ids(self, turns: list[tuple[str, str]], user: str) -> list[int]:
    if self.use_chat:
      messages = [{"role": "system", "content": self.system}] if self.system else []
      for u, answer in turns: messages += [{"role": "user", "content": u}, {"role": "assistant", "content": answer}]
      return self.llm.chat_template.encode(messages + [{"role": "user", "content": user}], self.llm.tokenizer)
    head = self.system + "\n" if self.system else ""
    return self.llm.tokenizer.encode(head + "".join(u + answer + "\n" for u, answer in turns) + user, bos=True)

  def prompt(self, user: str) -> tuple[list[int], str]:
    """The prompt ids for the next user message (older turns dropped as needed) and the message as it was used."""
    limit = self.llm.model.max_seq_len - self.room
    while len(ids := self._ids(self.turns, user)) > limit and self.turns:
      self.turns.pop(0)
      self.dropped += 1
    if len(ids) <= limit: return ids, user
    if self.policy == "error":
      raise ValueError(f"the message is {len(ids)} tokens with the system prompt, more than the {limit} that fit "
                       f"(max_seq_len {self.llm.model.max_seq_len}); send a shorter one")
    tokens = self.llm.tokenizer.encode(user, bos=False)
    keep = len(tokens) - (len(ids) - limit)
    while keep > 0 and len(ids := self._ids([], cut := self.llm.tokenizer.decode(tokens[-keep:]))) > limit: keep -= 1
    if keep <= 0: raise ValueError(f"the system prompt alone leaves no room in max_seq_len {self.llm.model.max_seq_len}")
    print(f"note: the message was cut to its last {keep} of {len(tokens)} tokens to fit the context", file=sys.stderr)
    return ids, cut

  def answered(self, user: str, answer: str) -> None: self.turns.append((user, answer))


class _CtrlC:
  """While active, Ctrl-C asks the current answer to stop (checked between pieces) instead of raising inside a
  decode step; a second Ctrl-C raises as usual."""

  def __enter__(self):
    self.hit = False
    def handler(signum, frame):
      if self.hit: raise KeyboardInterrupt
      self.hit = True
    self.previous = signal.signal(signal.SIGINT, handler) if threading.current_thread() is threading.main_thread() else None
    return self

  def __exit__(self, *exc):
    if self.previous is not None: signal.signal(signal.SIGINT, self.previous)


def chat_loop(llm, system: str | None, template: str, prompt: str | None, gen_kwargs: dict, model_path: str,
              ctx_policy: str = "truncate-oldest") -> None:
  """Read messages (or answer `prompt` once), stream the answers. Ctrl-C stops an answer and keeps what it said so
  far; Ctrl-C or Ctrl-D at the prompt quits."""
  from ..tokenizer import Llama2ChatTemplate, PlainTemplate
  use_chat = template == "llama2" or (template == "auto" and is_chat_model(model_path))
  llm.chat_template = Llama2ChatTemplate() if use_chat else PlainTemplate()
  chat = Conversation(llm, system, use_chat, ctx_policy, gen_kwargs.get("max_new_tokens", 256))
  interactive = prompt is None
  if interactive: print(f"tinyllama2 chat ({'chat format' if use_chat else 'text continuation'}); Ctrl-D to quit")
  while True:
    if interactive:
      try: user = read_line("> ")
      except (EOFError, KeyboardInterrupt):
        print()
        return
      if not user.strip(): continue
    else: user = prompt
    dropped = chat.dropped
    try: ids, user = chat.prompt(user)
    except ValueError as e:
      if not interactive: raise
      print(f"error: {e}", file=sys.stderr)
      continue
    if chat.dropped > dropped:
      print(f"note: the context is full: dropped the oldest {chat.dropped - dropped} turn(s)", file=sys.stderr)
    if not use_chat and not interactive: print(user, end="", flush=True)
    pieces = []
    with _CtrlC() as ctrl_c:
      for piece in llm.generate(ids, stream=True, **gen_kwargs):
        print(piece, end="", flush=True)
        pieces.append(piece)
        if ctrl_c.hit: break
    print(" [stopped]" if ctrl_c.hit else "")
    chat.answered(user, "".join(pieces))
    if not interactive: return


def main(a: argparse.Namespace) -> None:
  kw = sampling_kwargs(a)
  check_chat_args(a.system, a.prompt, kw)
  chat_loop(load_model(a), a.system, a.template, a.prompt, kw, a.model, a.ctx_policy)
