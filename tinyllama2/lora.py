"""LoRA: y = x W0^T + scale · dropout(x) A^T B^T with only A [r, in] and B [out, r] trained (scale = alpha / r).

Adapters are saved and loaded in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys such
as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) so they move between tinyllama2 and peft.
Our q/k weights are in Meta's interleaved-RoPE row order while Hugging Face's are permuted for rotate-half, so
lora_B of q_proj/k_proj is row-permuted on save and load, as the base weights are by the HF loader.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tinygrad import Tensor

from .checkpoint import safetensors
from .checkpoint.hf import permute_from_hf, permute_to_hf
from .fileio import write_text
from .layers import Linear, LoRALinear
from .model import Transformer

# Hugging Face module name -> (block attribute, our linear)
MODULES = {"q_proj": ("attention", "wq"), "k_proj": ("attention", "wk"), "v_proj": ("attention", "wv"),
           "o_proj": ("attention", "wo"), "gate_proj": ("feed_forward", "w1"), "up_proj": ("feed_forward", "w3"),
           "down_proj": ("feed_forward", "w2")}
_HF_PARENT = {"attention": "self_attn", "feed_forward": "mlp"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoraConfig:
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
  use_rslora: bool = False   # scale alpha / sqrt(r) instead of alpha / r

  def __post_init__(self):
    if self.r <= 0: raise ValueError(f"LoRA rank r must be positive, got {self.r}")
    if not 0 <= self.dropout < 1: raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    unknown = [m for m in self.target_modules if m not in MODULES]
    if unknown or not self.target_modules:
      raise ValueError(f"unknown LoRA target module(s) {unknown or '(none)'}; choose from {', '.join(MODULES)}")

  @property
  def scale(self) -> float: return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def lora_layers(model: Transformer) -> dict[str, LoRALinear]:
  """{PEFT module path: layer}, e.g. 'model.layers.0.self_attn.q_proj'."""
  out = {}
  for i, block in enumerate(model.layers):
    for hf, (parent, attr) in MODULES.items():
      lin = getattr(getattr(block, parent), attr)
      if isinstance(lin, LoRALinear): out[f"model.layers.{i}.{_HF_PARENT[parent]}.{hf}"] = lin
  return out


def inject(model: Transformer, cfg: LoraConfig, seed: int = 0) -> dict[str, Tensor]:
  """Wrap the target linears of every block with LoRA and freeze all base weights; the trainable tensors by name."""
  if model.quantization: raise ValueError("LoRA on quantized weights is not supported; load the model unquantized")
  if lora_layers(model): raise ValueError("this model already has LoRA adapters")
  Tensor.manual_seed(seed)
  for p in model.state_dict().values(): p.is_param_(False)
  for block in model.layers:
    for hf in cfg.target_modules:
      parent, attr = MODULES[hf]
      setattr(getattr(block, parent), attr, LoRALinear(getattr(getattr(block, parent), attr), cfg))
  model.weights_changed()
  return trainable(model)


def trainable(model: Transformer) -> dict[str, Tensor]:
  return {f"{path}.{ab}": getattr(lin, ab) for path, lin in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


@contextlib.contextmanager
def adapters_off(model: Transformer) -> Iterator[None]:
  """The base model from the same weights, every (unmerged) adapter bypassed meanwhile: a reference policy
  without a second copy of the model (for graphs built meanwhile; compiled ones keep what they captured)."""
  layers = [lin for lin in lora_layers(model).values() if not lin.merged]
  if not layers: raise ValueError("the model has no (unmerged) LoRA adapter to switch off")
  for lin in layers: lin.enabled = False
  try: yield
  finally:
    for lin in layers: lin.enabled = True


def merge(model: Transformer) -> None:
  """Fold every adapter into its base weight (W0 + scale·BA) and make the linears plain again."""
  for i, block in enumerate(model.layers):
    for parent, attr in MODULES.values():
      lin = getattr(getattr(block, parent), attr)
      if isinstance(lin, LoRALinear):
        lin.merge()
        setattr(getattr(block, parent), attr, Linear(lin.weight.is_param_(True)))
  model.weights_changed()


def _hf_permuted_heads(model: Transformer, path: str) -> int | None:
  """Heads of the HF rotate-half row permutation that lora_B of q_proj / k_proj needs (None for the others)."""
  if path.endswith("q_proj"): return model.args.n_heads
  if path.endswith("k_proj"): return model.args.n_kv_heads
  return None


def save_adapter(model: Transformer, out: str | Path, cfg: LoraConfig, base_model: str | None = None) -> None:
  """Write a PEFT-format adapter directory."""
  out = Path(out)
  tensors = {}
  for path, lin in lora_layers(model).items():
    b = lin.lora_B.numpy()
    if (heads := _hf_permuted_heads(model, path)) is not None: b = permute_to_hf(b, heads)
    tensors[f"base_model.model.{path}.lora_A.weight"] = lin.lora_A.numpy()
    tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(b)
  if not tensors: raise ValueError("the model has no LoRA adapters to save")
  out.mkdir(parents=True, exist_ok=True)
  safetensors.save(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
  write_text(out / ADAPTER_CONFIG, json.dumps(peft_config(cfg, base_model), indent=2, sort_keys=True))


def peft_config(cfg: LoraConfig, base_model: str | None) -> dict:
  """adapter_config.json as PEFT writes it for a plain LoRA adapter of a causal LM."""
  return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
          "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
          "layers_to_transform": None, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "modules_to_save": None,
          "peft_type": "LORA", "r": cfg.r, "rank_pattern": {}, "revision": None,
          "target_modules": sorted(cfg.target_modules), "task_type": "CAUSAL_LM", "use_dora": False,
          "use_rslora": cfg.use_rslora}


def read_adapter_config(path: Path) -> LoraConfig:
  f = path / ADAPTER_CONFIG
  if not f.is_file(): raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}; expected a PEFT LoRA adapter directory")
  try: c = json.loads(f.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e: raise ValueError(f"{f}: not valid JSON ({e})") from None
  if c.get("peft_type", "LORA") != "LORA": raise ValueError(f"{f}: peft_type {c.get('peft_type')!r} is not LORA")
  for key, plain in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
    if c.get(key) not in (None, plain): raise ValueError(f"{f}: {key}={c[key]!r} is not supported (plain LoRA only)")
  for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
    if c.get(key): raise ValueError(f"{f}: {key}={c[key]!r} is not supported (plain LoRA only)")
  targets = c.get("target_modules")
  if isinstance(targets, str): targets = [m for m in MODULES if re.fullmatch(targets, m) or re.search(rf"{targets}$", m)]
  try:
    return LoraConfig(r=int(c["r"]), alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout") or 0.0),
                      target_modules=list(targets or []), use_rslora=bool(c.get("use_rslora", False)))
  except KeyError as e: raise ValueError(f"{f}: missing {e.args[0]!r}") from None
  except (TypeError, ValueError) as e: raise ValueError(f"{f}: {e}") from None


def check_adapter_dir(path: str | Path) -> LoraConfig:
  """An adapter directory with its config and weights, checked before a (slow) model load."""
  path = Path(path).expanduser()
  if not path.exists(): raise FileNotFoundError(f"adapter not found: {path} (expected a PEFT LoRA adapter directory)")
  if not path.is_dir(): raise NotADirectoryError(f"adapter {path} is a file; expected a PEFT LoRA adapter directory")
  cfg = read_adapter_config(path)
  if not (path / ADAPTER_WEIGHTS).is_file():
    raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
  return cfg


def load_adapter(model: Transformer, path: str | Path) -> LoraConfig:
  """Inject LoRA layers as the adapter's config says and fill them from its safetensors file."""
  path = Path(path).expanduser()
  cfg = read_adapter_config(path)
  wfile = path / ADAPTER_WEIGHTS
  if not wfile.is_file(): raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
  tensors = safetensors.load(wfile)
  inject(model, cfg)
  layers = lora_layers(model)
  expected = {f"base_model.model.{p}.lora_{ab}.weight" for p in layers for ab in "AB"}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise ValueError(f"{wfile}: adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
  for p, lin in layers.items():
    a, b = tensors[f"base_model.model.{p}.lora_A.weight"], tensors[f"base_model.model.{p}.lora_B.weight"]
    if a.shape != tuple(lin.lora_A.shape) or b.shape != tuple(lin.lora_B.shape):
      raise ValueError(f"{wfile}: {p} has lora_A {a.shape} / lora_B {b.shape}, the model needs "
                       f"{tuple(lin.lora_A.shape)} / {tuple(lin.lora_B.shape)}")
    if (heads := _hf_permuted_heads(model, p)) is not None: b = permute_from_hf(b, heads)
    lin.lora_A.assign(Tensor(np.array(a, dtype=np.float32), device=lin.lora_A.device)).realize()
    lin.lora_B.assign(Tensor(np.array(b, dtype=np.float32), device=lin.lora_B.device)).realize()
  return cfg
