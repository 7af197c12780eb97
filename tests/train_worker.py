"""Subprocess for the resume test: LoRA (with dropout, so the RNG state matters) on a tiny random model.

  python train_worker.py OUT STEPS [--resume]
"""
import sys

import numpy as np

from tinyllama2 import ModelArgs, Transformer, lora
from tinyllama2.train import Blocks, TrainConfig, Trainer


def main() -> None:
  out, steps, resume = sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv
  args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=13, hidden_dim=24, max_position_embeddings=16)
  model = Transformer(args, max_seq_len=16)
  model.init_random(seed=0, std=0.3)
  params = lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "down_proj"]), seed=1)
  data = Blocks(np.random.default_rng(0).integers(0, 13, size=(20, 9)).astype(np.int32), np.ones((20, 8), np.float32))
  cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, save_every=1, eval_every=1000)
  trainer = Trainer(model, params, data, None, cfg)
  if resume: trainer.resume()
  trainer.fit(progress=False)


if __name__ == "__main__":
  main()
