"""tinyllama2: a compact Llama-2 stack on tinygrad."""
from pathlib import Path

from . import devices  # noqa: F401  (first: it reads the user's DEV before tinygrad can write its own)
from .runtime import setup

setup()   # before tinygrad is imported: it reads HCQ2 once, at import

from .config import ModelArgs  # noqa: E402
from .generate import Generation, GenerationConfig  # noqa: E402
from .llama import Llama  # noqa: E402
from .model import Transformer  # noqa: E402
from .tokenizer import Llama2ChatTemplate, PlainTemplate, Tokenizer  # noqa: E402

DEFAULT_MODEL = Path(__file__).parent / "default_model"   # a small story model trained by examples/pretrain.py

__all__ = ["DEFAULT_MODEL", "Llama", "Generation", "GenerationConfig", "ModelArgs", "Transformer", "Tokenizer",
           "Llama2ChatTemplate", "PlainTemplate"]
