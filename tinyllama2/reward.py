"""Reward models: a Llama trunk and a linear score head read at each sequence's last token.

On disk they use Hugging Face's `LlamaForSequenceClassification` layout (what trl's RewardTrainer writes and
transformers loads unchanged): the trunk's `model.*` weights, `score.weight` [1, dim], no `lm_head`, and
`num_labels: 1` and a `pad_token_id` in config.json. Hugging Face reads the score at the last token that is not
padding; we pad with `PAD_ID` (SentencePiece's <unk>, which text never encodes to) and read it at the same place.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tinygrad import Tensor

from .layers import Linear
from .model import Transformer

SCORE = "score.weight"   # our name of the head and Hugging Face's
PAD_ID = 0
ARCHITECTURE = "LlamaForSequenceClassification"


def new_score_head(model: Transformer, seed: int = 0, std: float = 0.02) -> Linear:
  """A float32 score head [1, dim] drawn from normal(0, std) (transformers' initializer_range)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(0.0, std, size=(1, model.args.dim)).astype(np.float32)
  return Linear(Tensor(w, device=model.device).contiguous().realize())


def last_token_scores(model: Transformer, score: Linear, tokens: Tensor, last: Tensor) -> Tensor:
  """Float32 rewards [B] of token rows [B, T] from position 0, read at row b's token last[b] (causal attention:
  what follows it, padding, does not change it)."""
  h = model.forward_hidden(model.embed(tokens), 0, None)                        # [B, T, dim]
  pick = Tensor.arange(tokens.shape[1]).to(tokens.device) == last.reshape(-1, 1)
  h_last = pick.unsqueeze(-1).where(h, 0).sum(1)                                # [B, dim]
  return (h_last.float() @ score.weight.T.float()).reshape(-1)


def is_reward_config(cfg: dict) -> bool: return ARCHITECTURE in (cfg.get("architectures") or [])


def hf_config_overrides(pad_id: int = PAD_ID) -> dict:
  """What turns a LlamaForCausalLM config.json into a one-label LlamaForSequenceClassification one."""
  return {"architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
          "pad_token_id": pad_id, "tie_word_embeddings": False}


def save(out: str | Path, model: Transformer, score: Linear, tokenizer_model: str | Path | None = None) -> None:
  """Write the trunk (LoRA folded in, no LM head) and the score head as a Hugging Face directory."""
  from .checkpoint import hf
  weights = {k: v.float().numpy() for k, v in _trunk_weights(model).items()}
  weights[SCORE] = score.weight.float().numpy()
  hf.save(out, model.args.replace(tie_embeddings=False), weights, tokenizer_model=tokenizer_model,
          config_overrides=hf_config_overrides())


def _trunk_weights(model: Transformer) -> dict[str, Tensor]:
  """The trunk's weights with any LoRA update added (a merged copy; the model itself is left as it is)."""
  from .layers import LoRALinear
  out = {k: v for k, v in model.state_dict().items() if "lora_" not in k and not k.startswith("output.")}
  for i, block in enumerate(model.layers):
    for parent in ("attention", "feed_forward"):
      for attr, lin in vars(getattr(block, parent)).items():
        if isinstance(lin, LoRALinear) and not lin.merged:
          out[f"layers.{i}.{parent}.{attr}.weight"] = lin.weight.float() + lin.delta()
  return out


def read_config(path: str | Path) -> dict | None:
  """config.json of a Hugging Face directory, None for anything else."""
  cfg = Path(path) / "config.json"
  if not cfg.is_file(): return None
  try: return json.loads(cfg.read_text())
  except (OSError, ValueError): return None
