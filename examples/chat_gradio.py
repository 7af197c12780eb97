"""Chat with a Llama model in the browser: a Gradio ChatInterface over the model's engine (pip install -e ".[gradio]").

  python examples/chat_gradio.py                                  # the bundled story model on http://127.0.0.1:7860
  python examples/chat_gradio.py --model path/to/llama-2-7b-chat-hf --system "You are a helpful assistant."

Answers stream; the history, the system prompt and the sampling settings (temperature, top-p, max tokens) go with
each message; a conversation longer than the context loses its oldest turns, as in `tinyllama2 chat`. Several
browser tabs chat at once: their requests share the engine's slots. Runs offline (no analytics, no share link).
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # offline: Gradio would otherwise phone home

from tinyllama2 import DEFAULT_MODEL
from tinyllama2.cli import ArgParser, add_debug_flag, run_cli
from tinyllama2.cli.chat import Conversation, is_chat_model
from tinyllama2.cli.common import add_model_args, int_flag, load_model
from tinyllama2.tokenizer import Llama2ChatTemplate, PlainTemplate


def text_of(content) -> str:
  """A Gradio message's text (a string, or a list of parts of which the text ones count)."""
  if isinstance(content, str): return content
  if isinstance(content, list): return "".join(text_of(p.get("text", "")) if isinstance(p, dict) else text_of(p) for p in content)
  return ""


def responder(llm, use_chat: bool):
  """The ChatInterface function: (message, history, system, temperature, top_p, max_tokens) → growing answer."""
  def respond(message: str, history: list[dict], system: str, temperature: float, top_p: float,
              max_tokens: float) -> Iterator[str]:
    convo = Conversation(llm, system.strip() or None, use_chat, "truncate-oldest", int(max_tokens))
    users = [text_of(m["content"]) for m in history if m.get("role") == "user"]
    answers = [text_of(m["content"]) for m in history if m.get("role") == "assistant"]
    convo.turns = list(zip(users, answers))
    ids, _ = convo.prompt(text_of(message))
    stream = llm.generate(ids, stream=True, max_new_tokens=int(max_tokens), do_sample=temperature > 0,
                          temperature=temperature or 1.0, top_p=top_p, top_k=0)
    answer = ""
    for piece in stream:
      answer += piece
      yield answer
  return respond


def build_demo(llm, use_chat: bool, title: str = "tinyllama2"):
  import gradio as gr
  context = llm.model.max_seq_len
  settings = [gr.Textbox(label="System prompt", lines=2),
              gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)"),
              gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p"),
              gr.Slider(1, context, value=min(256, context // 2), step=1, label="Max new tokens")]
  return gr.ChatInterface(responder(llm, use_chat), additional_inputs=settings, title=title,
                          concurrency_limit=llm.engine.slots, flagging_mode="never")


def main() -> int:
  p = ArgParser(description="chat with a Llama model in the browser (Gradio)")
  add_model_args(p, required=False)
  p.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto", help="chat format")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on")
  p.add_argument("--port", type=int_flag(0), default=7860, help="port")
  add_debug_flag(p)
  a = p.parse_args()

  def run(a: argparse.Namespace) -> None:
    try: import gradio  # noqa: F401
    except ImportError: raise ValueError("this example needs Gradio: pip install -e '.[gradio]'") from None
    a.model = a.model or str(DEFAULT_MODEL)
    llm = load_model(a)
    use_chat = a.template == "llama2" or (a.template == "auto" and is_chat_model(a.model))
    llm.chat_template = Llama2ChatTemplate() if use_chat else PlainTemplate()
    build_demo(llm, use_chat).launch(server_name=a.host, server_port=a.port, share=False)
  return run_cli(run, a)


if __name__ == "__main__":
  raise SystemExit(main())
