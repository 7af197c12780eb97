"""tinyllama2: a compact Llama-2 stack on tinygrad."""
from .config import ModelArgs
from .generate import Generation, GenerationConfig
from .llama import Llama
from .model import Transformer
from .tokenizer import Llama2ChatTemplate, PlainTemplate, Tokenizer

__all__ = ["Llama", "Generation", "GenerationConfig", "ModelArgs", "Transformer", "Tokenizer", "Llama2ChatTemplate",
           "PlainTemplate"]
