"""Rotary position embeddings with the scaling schemes of Hugging Face transformers.

All tables are computed once in float64 numpy and handed to the model as cos/sin tensors of shape
[max_seq_len, head_dim // 2]. Pairs are rotated in the interleaved layout of Meta/llama2.c (2i, 2i+1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
  """A `rope_scaling` entry as Hugging Face's config.json spells it (unused fields keep HF's defaults)."""
  type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  low_freq_factor: float = 1.0           # llama3
  high_freq_factor: float = 4.0          # llama3
  beta_fast: float = 32.0                # yarn
  beta_slow: float = 1.0                 # yarn
  attention_factor: float | None = None  # yarn; None = 0.1 * ln(factor) + 1
  mscale: float | None = None            # yarn (DeepSeek style)
  mscale_all_dim: float | None = None    # yarn (DeepSeek style)
  truncate: bool = True                  # yarn

  @staticmethod
  def from_dict(d: dict | RopeScaling | None) -> RopeScaling | None:
    """Accepts {"type"|"rope_type": ..., "factor": ...} (hub configs) or transformers-5 `rope_parameters`."""
    if d is None or isinstance(d, RopeScaling): return d
    if not isinstance(d, dict): raise ValueError(f"rope_scaling must be a dict like {{'type': 'linear', 'factor': 2.0}}, got {d!r}")
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "su" or kind == "longrope": raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}")
    if kind not in ROPE_TYPES: raise ValueError(f"unknown rope_scaling type {kind!r}; expected one of {ROPE_TYPES}")
    known = {f.name for f in fields(RopeScaling)} - {"type"}
    kwargs = {k: v for k, v in d.items() if k in known and v is not None}
    if not isinstance(kwargs.get("factor", 1.0), (int, float)) or isinstance(kwargs.get("factor"), bool):
      raise ValueError(f"rope_scaling factor must be a number, got {kwargs['factor']!r}")
    if kind != "default" and "factor" not in kwargs: raise ValueError(f"rope_scaling type {kind!r} needs a 'factor'")
    scaling = RopeScaling(type=kind, **kwargs)
    if kind != "default" and scaling.factor <= 0: raise ValueError(f"rope_scaling factor must be positive, got {scaling.factor}")
    return None if kind == "default" else scaling


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling, max_pos: int) -> np.ndarray:
  old_ctx = s.original_max_position_embeddings or max_pos
  low_wavelen, high_wavelen = old_ctx / s.low_freq_factor, old_ctx / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
  if s.attention_factor is not None: return s.attention_factor
  if s.mscale and s.mscale_all_dim: return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
  return _yarn_mscale(s.factor)


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling, max_pos: int) -> np.ndarray:
  orig = s.original_max_position_embeddings or max_pos
  def correction_dim(rotations: float) -> float:
    return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate: low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high: high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolation_weight = 1 - ramp
  pos_freqs = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  return (1 / (s.factor * pos_freqs)) * (1 - extrapolation_weight) + (1 / pos_freqs) * extrapolation_weight


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, max_pos: int, seq_len: int | None = None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2]. `seq_len` only matters for dynamic scaling."""
  base = default_inv_freq(head_dim, theta)
  if scaling is None: return base
  if scaling.type == "linear": return base / scaling.factor
  if scaling.type == "dynamic":
    if seq_len is None or seq_len <= max_pos: return base
    scaled_theta = theta * ((scaling.factor * seq_len / max_pos) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, scaled_theta)
  if scaling.type == "llama3": return _llama3_inv_freq(base, scaling, max_pos)
  if scaling.type == "yarn": return _yarn_inv_freq(head_dim, theta, scaling, max_pos)
  raise ValueError(f"unknown rope scaling type {scaling.type!r}")


def rope_tables(head_dim: int, theta: float, scaling: RopeScaling | None, max_pos: int, n_positions: int,
                prompt_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin tables [n_positions, head_dim // 2] (float32).

  `max_pos` is the trained context (max_position_embeddings). Dynamic NTK scaling changes the frequencies with
  the sequence length L: row p uses the frequencies for L = p + 1, which is what Hugging Face computes while
  decoding token by token. Keys already in the KV cache keep the rotation they were stored with (HF caches
  rotated keys too). A prompt of `prompt_len` > `max_pos` tokens prefilled in one call is rotated, as in HF's
  forward, with the frequencies of its full length: rows 0..prompt_len-1 use L = prompt_len.
  """
  positions = np.arange(n_positions, dtype=np.float64)
  if scaling is not None and scaling.type == "dynamic" and n_positions > max_pos:
    angles = np.empty((n_positions, head_dim // 2), dtype=np.float64)
    angles[:max_pos] = np.outer(positions[:max_pos], inv_freq(head_dim, theta, None, max_pos))
    for p in range(max_pos, n_positions):
      angles[p] = p * inv_freq(head_dim, theta, scaling, max_pos, seq_len=p + 1)
    if prompt_len is not None and prompt_len > max_pos:
      angles[:prompt_len] = np.outer(positions[:prompt_len], inv_freq(head_dim, theta, scaling, max_pos, seq_len=prompt_len))
  else:
    angles = np.outer(positions, inv_freq(head_dim, theta, scaling, max_pos))
  scale = yarn_attention_factor(scaling) if scaling is not None and scaling.type == "yarn" else 1.0
  return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)
