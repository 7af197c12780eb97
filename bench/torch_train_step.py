"""The reference for bench/train_speed.py: the same train step in Hugging Face transformers (+ peft for LoRA) on
PyTorch's CPU — LlamaForCausalLM of the same shape, random tokens, cross-entropy, gradient clipping at 1.0, AdamW
(weight decay 0.1). Run by the interpreter given to `train_speed.py --torch PYTHON`, which must have torch and
transformers (and peft for LoRA); prints one JSON line {"tokens_per_s": ...}.

  python bench/torch_train_step.py '{"hidden_size": ...}' --mode lora --seq-len 256 --batch-size 4 --steps 3 --threads 2
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_and_params(config: dict, mode: str):
  model = LlamaForCausalLM(LlamaConfig(**config)).float()
  if mode == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
  return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
  p = argparse.ArgumentParser(description="one transformers train step's tokens/s")
  p.add_argument("config", help="the Hugging Face config as JSON")
  p.add_argument("--mode", choices=["full", "lora"], default="full")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(a.threads)
  config = json.loads(a.config)
  model, params = model_and_params(config, a.mode)
  model.train()
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, config["vocab_size"], (a.batch_size * (a.steps + 3), a.seq_len + 1))
  def step(i: int) -> None:
    rows = tokens[i * a.batch_size:(i + 1) * a.batch_size]
    logits = model(input_ids=rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  for i in range(3): step(i)   # warm-up, as ours compiles
  t = time.perf_counter()
  for i in range(a.steps): step(3 + i)
  print(json.dumps({"tokens_per_s": a.steps * a.batch_size * a.seq_len / (time.perf_counter() - t)}))


if __name__ == "__main__":
  main()
