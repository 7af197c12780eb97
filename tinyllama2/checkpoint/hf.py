"""Hugging Face Llama directories: config.json + model.safetensors (or shards with an index), both ways.

HF stores q_proj/k_proj rows permuted for its rotate-half RoPE; we permute them back to Meta's interleaved
layout on load and forward again on save, exactly as transformers' conversion script does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..config import ModelArgs, from_hf_config, to_hf_config
from ..fileio import write_text
from . import safetensors

INDEX = "model.safetensors.index.json"
_LAYER_NAMES = {  # ours -> HF, inside model.layers.{i}.
  "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
  "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
  "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
  "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight", "score.weight": "score.weight"}   # score: a reward model's head


def is_hf_dir(path: Path) -> bool: return path.is_dir() and (path / "config.json").is_file()


def hf_name(ours: str) -> str:
  if ours in _TOP_NAMES: return _TOP_NAMES[ours]
  _, i, rest = ours.split(".", 2)
  return f"model.layers.{i}.{_LAYER_NAMES[rest]}"


def our_name(hf: str) -> str | None:
  for ours, theirs in _TOP_NAMES.items():
    if hf == theirs: return ours
  if hf.startswith("model.layers."):
    _, _, i, rest = hf.split(".", 3)
    for ours, theirs in _LAYER_NAMES.items():
      if rest == theirs: return f"layers.{i}.{ours}"
  return None


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Meta interleaved rows (pairs 2i, 2i+1 per head) -> HF rotate-half rows (first half, second half)."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _read_json(path: Path) -> dict:
  try: data = json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e: raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict): raise ValueError(f"{path}: expected a JSON object")
  return data


def _safetensor_files(d: Path) -> list[Path]:
  if (d / INDEX).is_file():
    weight_map = _read_json(d / INDEX).get("weight_map")
    if not isinstance(weight_map, dict): raise ValueError(f"{d / INDEX}: missing 'weight_map'")
    files = sorted({d / f for f in weight_map.values()})
    for f in files:
      if not f.is_file(): raise FileNotFoundError(f"{d}: shard {f.name} named in {INDEX} is missing")
    return files
  if (d / "model.safetensors").is_file(): return [d / "model.safetensors"]
  shards = sorted(d.glob("*.safetensors"))
  if shards: return shards
  if any(d.glob("*.bin")) or any(d.glob("*.pt")):
    raise ValueError(f"{d}: only PyTorch pickle weights found; tinyllama2 reads safetensors for HF directories "
                     "(save with safe_serialization=True)")
  raise FileNotFoundError(f"{d}: no model.safetensors (or {INDEX}) found beside config.json")


def load(path: str | Path) -> tuple[ModelArgs, dict[str, np.ndarray]]:
  d = Path(path)
  args = from_hf_config(_read_json(d / "config.json"), source=str(d / "config.json"))
  weights: dict[str, np.ndarray] = {}
  for f in _safetensor_files(d):
    for name, arr in safetensors.load(f).items():
      ours = our_name(name)
      if ours is None:
        if name.endswith("rotary_emb.inv_freq"): continue
        raise ValueError(f"{f}: unexpected tensor {name!r} for a Llama model")
      weights[ours] = arr
  for i in range(args.n_layers):
    for key, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
      name = f"layers.{i}.attention.{key}.weight"
      if name in weights:
        if weights[name].ndim != 2 or weights[name].shape[0] % (2 * heads):
          raise ValueError(f"{d}: {hf_name(name)} has shape {weights[name].shape}, which does not fit {heads} heads")
        weights[name] = permute_from_hf(weights[name], heads)
  if args.tie_embeddings: weights.pop("output.weight", None)
  return args, weights


def save(out: str | Path, args: ModelArgs, weights: dict[str, np.ndarray], tokenizer_model: str | Path | None = None,
         dtype: str = "float32", max_shard_bytes: int = 5 * 1024**3, config_overrides: dict | None = None) -> None:
  """Write an HF directory; dtype is float32, float16 or bfloat16. Shards past max_shard_bytes, with an index.
  config_overrides: keys replaced in config.json (a reward model's architecture and labels)."""
  out = Path(out)
  if dtype not in ("float32", "float16", "bfloat16"): raise ValueError(f"unsupported dtype {dtype!r} for HF export")
  out.mkdir(parents=True, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  for name, arr in weights.items():
    if args.tie_embeddings and name == "output.weight": continue
    arr = np.asarray(arr, dtype=np.float32)
    if name.endswith("attention.wq.weight"): arr = permute_to_hf(arr, args.n_heads)
    if name.endswith("attention.wk.weight"): arr = permute_to_hf(arr, args.n_kv_heads)
    tensors[hf_name(name)] = arr.astype(np.float16) if dtype == "float16" else arr
  bf16 = set(tensors) if dtype == "bfloat16" else None
  itemsize = 4 if dtype == "float32" else 2
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if size and size + arr.size * itemsize > max_shard_bytes: shards, size = shards + [{}], 0
    shards[-1][name] = arr
    size += arr.size * itemsize
  if len(shards) == 1: safetensors.save(shards[0], out / "model.safetensors", bf16=bf16)
  else:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.save(shard, out / fname, bf16=bf16)
      weight_map.update({n: fname for n in shard})
      total += sum(a.size * itemsize for a in shard.values())
    write_text(out / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  write_text(out / "config.json", json.dumps(to_hf_config(args, dtype) | (config_overrides or {}), indent=2))
  eos = args.eos_id
  write_text(out / "generation_config.json", json.dumps({"bos_token_id": args.bos_id, "eos_token_id": eos}, indent=2))
  if tokenizer_model is not None and Path(tokenizer_model).resolve() != (out / "tokenizer.model").resolve():
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
