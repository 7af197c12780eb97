"""tinyllama2: a compact Llama-2 stack on tinygrad."""
from pathlib import Path

from .config import ModelArgs
from .generate import Generation, GenerationConfig
from .llama import Llama
from .model import Transformer
from .tokenizer import Llama2ChatTemplate, PlainTemplate, Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "default_model"   # a small story model trained by examples/pretrain.py

__all__ = ["DEFAULT_MODEL", "Llama", "Generation", "GenerationConfig", "ModelArgs", "Transformer", "Tokenizer", "Llama2ChatTemplate",
           "PlainTemplate"]
