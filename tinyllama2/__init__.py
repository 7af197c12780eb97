"""tinyllama2: a compact Llama-2 stack on tinygrad."""
import os
import sys
from pathlib import Path

# tinygrad 0.14 launches CPU kernels one by one from Python (~30-50 us each, ~130 per decoded token) unless its
# HCQ2 queue runtime is on (~7 us each: a worker thread runs the captured command ring). tinygrad reads the switch
# once, when it is imported, so it is set here, for CPU runs with the default clang compiler only (its queue
# program does not render with LLVM: DEV=CPU:LLVM), unless the user chose a value or imported tinygrad first.
_device, _, _compiler = os.environ.get("DEV", "CPU").upper().partition(":")
if "tinygrad" not in sys.modules and _device == "CPU" and _compiler in ("", "CLANG"):
  os.environ.setdefault("HCQ2", "1")
del _device, _compiler

from .config import ModelArgs  # noqa: E402
from .generate import Generation, GenerationConfig  # noqa: E402
from .llama import Llama  # noqa: E402
from .model import Transformer  # noqa: E402
from .tokenizer import Llama2ChatTemplate, PlainTemplate, Tokenizer  # noqa: E402

DEFAULT_MODEL = Path(__file__).parent / "default_model"   # a small story model trained by examples/pretrain.py

__all__ = ["DEFAULT_MODEL", "Llama", "Generation", "GenerationConfig", "ModelArgs", "Transformer", "Tokenizer", "Llama2ChatTemplate",
           "PlainTemplate"]
