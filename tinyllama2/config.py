"""Model hyperparameters (`ModelArgs`), named presets and readers for the config formats of each checkpoint kind."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from .rope import RopeScaling


def meta_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
  """SwiGLU width as Meta's reference code computes it: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None: hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
  dim: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int | None = None
  vocab_size: int = 32000
  hidden_dim: int | None = None          # None: computed from multiple_of / ffn_dim_multiplier as Meta does
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048    # the context the checkpoint was trained with
  tie_embeddings: bool = False
  bos_id: int = 1
  eos_id: int | list[int] = 2
  extra: dict = field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.n_kv_heads is None: self.n_kv_heads = self.n_heads
    if self.hidden_dim is None: self.hidden_dim = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
    self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_position_embeddings"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
    if self.dim % self.n_heads: raise ValueError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model config: n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
    if self.head_dim % 2: raise ValueError(f"model config: head_dim {self.head_dim} must be even for RoPE")

  @property
  def head_dim(self) -> int: return self.dim // self.n_heads

  def default_max_seq_len(self) -> int:
    """The trained context, times the RoPE scaling factor when the scaling extends it."""
    s = self.rope_scaling
    if s is None: return self.max_position_embeddings
    base = s.original_max_position_embeddings or self.max_position_embeddings
    return max(self.max_position_embeddings, int(base * s.factor))

  def n_params(self) -> int:
    attn = self.dim * self.dim * 2 + 2 * self.dim * self.n_kv_heads * self.head_dim
    layer = attn + 3 * self.dim * self.hidden_dim + 2 * self.dim
    return self.n_layers * layer + self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.dim

  def replace(self, **changes) -> ModelArgs: return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelArgs] = {
  "stories260K": ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172,
                           max_position_embeddings=512, tie_embeddings=True),
  "stories15M": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768, max_position_embeddings=256,
                          tie_embeddings=True),
  "stories42M": ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, hidden_dim=1376, max_position_embeddings=1024,
                          tie_embeddings=True),
  "stories110M": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_position_embeddings=1024,
                           tie_embeddings=True),
  "tinyllama-1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632,
                              max_position_embeddings=2048),
  "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, max_position_embeddings=4096),
  "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824, max_position_embeddings=4096),
  "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672,
                          max_position_embeddings=4096),
}


def preset(name: str) -> ModelArgs:
  if name not in PRESETS: raise ValueError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
  return dataclasses.replace(PRESETS[name])


HF_ARCHITECTURES = {"LlamaForCausalLM", "LlamaForSequenceClassification"}   # the second: reward models


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling dict) from either hub-style keys or transformers-5 `rope_parameters`."""
  params = cfg.get("rope_parameters")
  if isinstance(params, dict):
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (None if kind == "default" else dict(params))
  return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
  """ModelArgs from a Hugging Face `config.json` of a Llama model."""
  archs = cfg.get("architectures") or []
  model_type = cfg.get("model_type")
  if model_type not in (None, "llama") or (archs and not set(archs) & HF_ARCHITECTURES):
    raise ValueError(f"{source}: unsupported architecture {archs or model_type!r}; tinyllama2 loads Llama models "
                     f"({', '.join(sorted(HF_ARCHITECTURES))}, model_type 'llama')")
  try:
    theta, scaling = _rope_from_hf(cfg)
    n_heads = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    if cfg.get("head_dim") not in (None, dim // n_heads):
      raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size/num_attention_heads is not supported")
    eos = cfg.get("eos_token_id", 2)
    return ModelArgs(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                     n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), vocab_size=int(cfg["vocab_size"]),
                     hidden_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     rope_theta=theta, rope_scaling=scaling,
                     max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     bos_id=int(cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else 1),
                     eos_id=eos if eos is not None else 2)
  except KeyError as e:
    raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    if str(e).startswith(source): raise
    raise ValueError(f"{source}: {e}") from None


def to_hf_config(args: ModelArgs, dtype: str = "float32") -> dict:
  cfg = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
    "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
    "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
    "rope_theta": args.rope_theta, "max_position_embeddings": args.max_position_embeddings,
    "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "bos_token_id": args.bos_id,
    "eos_token_id": args.eos_id, "torch_dtype": dtype, "attention_bias": False, "mlp_bias": False,
    "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
  }
  s = args.rope_scaling
  if s is not None:
    d = {"rope_type": s.type, "factor": s.factor}
    if s.original_max_position_embeddings: d["original_max_position_embeddings"] = s.original_max_position_embeddings
    if s.type == "llama3": d.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.type == "yarn":
      d.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
      if s.attention_factor is not None: d["attention_factor"] = s.attention_factor
    cfg["rope_scaling"] = d
  return cfg


def warn_if_beyond_trained(args: ModelArgs, max_seq_len: int) -> None:
  if max_seq_len > args.default_max_seq_len():
    warnings.warn(f"max_seq_len {max_seq_len} is beyond the trained context {args.default_max_seq_len()}; "
                  "quality may degrade without RoPE scaling", stacklevel=3)
