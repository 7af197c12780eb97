"""Chat with a Llama model in the terminal (streamed), or answer one --prompt and exit.

  python examples/chat.py                                        # the bundled story model
  python examples/chat.py --model path/to/llama-2-7b-chat-hf
  python examples/chat.py --model stories260K.bin --tokenizer tok512.model --prompt "Once upon a time"
"""
import argparse
import sys

from tinyllama2 import DEFAULT_MODEL
from tinyllama2.cli import ArgParser, add_debug_flag, run_cli
from tinyllama2.cli.chat import add_ctx_policy_arg, chat_loop, check_chat_args
from tinyllama2.cli.common import float_flag, int_flag, load_model


def main() -> int:
  p = ArgParser(description="chat with a Llama model")
  p.add_argument("--model", default=str(DEFAULT_MODEL),
                 help="HF / Meta directory, .gguf or llama2.c .bin (default: the bundled 1.2M-parameter story model)")
  p.add_argument("--tokenizer", help="tokenizer.model, when it is not beside the weights")
  p.add_argument("--device", help="tinygrad device (default: $DEV, else CPU)")
  p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: as stored)")
  p.add_argument("--temperature", type=float_flag(0), default=0.7, help="sampling temperature (0 = greedy)")
  p.add_argument("--system", help="system prompt (chat models)")
  p.add_argument("--max-new-tokens", type=int_flag(0), default=256, help="longest answer in tokens")
  p.add_argument("--prompt", help="answer this message and exit")
  p.add_argument("--template", choices=["auto", "llama2", "plain"], default="auto", help="chat format")
  p.add_argument("--seed", type=int_flag(0), help="sampling seed")
  p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization")
  p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory to apply")
  p.add_argument("--max-seq-len", type=int_flag(1), help="context length (default: the model's trained context)")
  add_ctx_policy_arg(p)
  add_debug_flag(p)
  a = p.parse_args()
  a.rope_scaling = None
  gen = dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0, temperature=a.temperature or 1.0,
             top_p=0.9, top_k=0, seed=a.seed)
  def run(a: argparse.Namespace) -> None:
    check_chat_args(a.system, a.prompt, gen)
    chat_loop(load_model(a), a.system, a.template, a.prompt, gen, a.model, a.ctx_policy)
  return run_cli(run, a)


if __name__ == "__main__":
  sys.exit(main())
