"""Training: data (corpora, instruction sets), losses, and the Trainer with resumable checkpoints."""
from .data import Blocks, sft_blocks, text_blocks
from .losses import lm_loss
from .trainer import TrainConfig, Trainer, lr_at

__all__ = ["Blocks", "TrainConfig", "Trainer", "lm_loss", "lr_at", "sft_blocks", "text_blocks"]
