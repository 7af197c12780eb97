"""Running one model on several devices with tinygrad's sharded tensors (`Tensor.shard`).

Tensor parallel (`shard_model`, inference): each device holds a slice of every projection, as Megatron-LM splits
them — q/k/v and gate/up by output rows (whole attention heads, GQA groups kept with their key/value head), wo and
the down projection by input columns, so tinygrad sums their partial products across the devices (an all-reduce);
the output head by vocabulary rows; the KV caches by key/value heads; the embedding table, the norms and RoPE's
tables whole on each. Data parallel (`replicate_model`, training): every device holds all the weights and a slice of
each batch (`shard_rows`); tinygrad all-reduces the gradients.

Sharded tensors have a tuple for a device, so the hand-written CPU and GPU kernels (`ops`), which take one device's
buffers, step aside and tinygrad's own graph computes every product.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tinygrad import Tensor

from .devices import resolve_device
from .layers import BLOCK, Linear, QuantLinear

Devices = tuple[str, ...]


def parse_devices(devices: str | Sequence[str]) -> Devices:
  """'CPU:0,CPU:1' or a list of names → tinygrad's names of those devices, each opened once; at least two, distinct."""
  names = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else [str(d).strip() for d in devices]
  if len(names) < 2 or not all(names):
    raise ValueError(f"devices must name at least two devices, such as CPU:0,CPU:1 (got {devices!r}); for one "
                     "device use device= (--device)")
  canon = tuple(resolve_device(n) for n in names)
  if len(set(canon)) != len(canon):
    raise ValueError(f"devices {', '.join(canon)} name a device twice: each shard needs a device of its own "
                     "(CPU:0,CPU:1 are two)")
  return canon


# ---- tensor parallel ------------------------------------------------------------------------------
ROW_SPLIT = ("wq", "wk", "wv", "w1", "w3")   # split by output rows
COLUMN_SPLIT = ("wo", "w2")                  # split by input columns (their products summed across devices)


def check_tensor_parallel(model, n: int) -> None:
  """A one-line error unless every split falls between whole heads and equal shares of the feed-forward width."""
  a = model.args
  for what, count in (("attention heads", a.n_heads), ("key/value heads", a.n_kv_heads),
                      ("feed-forward width", a.hidden_dim)):
    if count % n:
      raise ValueError(f"{n} devices cannot split the model's {count} {what} evenly: use a number of devices that "
                       f"divides {count}")


def _column_axis(layer, n: int) -> int | None:
  """Axis 1 (the input axis of [out, in] weights and of [out, blocks, ...] / [out, blocks] quantized blocks), or
  None — the layer whole on each device, its input gathered — where quantization blocks do not divide evenly."""
  return None if isinstance(layer, QuantLinear) and (layer.in_features // BLOCK) % n else 1


def _place(layer, axis: int | None, devices: Devices) -> None:
  if isinstance(layer, QuantLinear):
    layer.packed = layer.packed.shard(devices, axis=axis).realize()
    layer.scale = layer.scale.shard(devices, axis=axis).realize()
  elif isinstance(layer, Linear): layer.weight.replace(layer.weight.shard(devices, axis=axis).realize())
  else: raise ValueError(f"cannot shard a {type(layer).__name__}: merge LoRA adapters into the weights first")


def shard_model(model, devices: Sequence[str]) -> None:
  """Spread `model` (loaded on devices[0]) over `devices` for tensor-parallel inference, in place."""
  devices = tuple(devices)
  check_tensor_parallel(model, len(devices))
  for block in model.layers:
    for owner in (block.attention, block.feed_forward):
      for name in ROW_SPLIT:
        if hasattr(owner, name): _place(getattr(owner, name), 0, devices)
      for name in COLUMN_SPLIT:
        if hasattr(owner, name): _place(getattr(owner, name), _column_axis(getattr(owner, name), len(devices)), devices)
    for norm in (block.attention_norm, block.ffn_norm): norm.weight.replace(norm.weight.shard(devices).realize())
  model.norm.weight.replace(model.norm.weight.shard(devices).realize())
  if model.output is not None:
    _place(model.output, 0 if model.args.vocab_size % len(devices) == 0 else None, devices)
  _place(model.tok_embeddings, None, devices)
  _replicate_rope(model, devices)
  model.device, model.kv_split = devices, True
  model.weights_changed()


# ---- data parallel --------------------------------------------------------------------------------
def replicate_model(model, devices: Sequence[str]) -> None:
  """A whole copy of every parameter of `model` on each of `devices`, in place (data-parallel training)."""
  devices = tuple(devices)
  for t in model.state_dict().values(): t.replace(t.shard(devices).realize())
  _replicate_rope(model, devices)
  model.device, model.kv_split = devices, False
  model.weights_changed()


def shard_rows(rows: np.ndarray, devices: Devices) -> Tensor:
  """A batch split along its first axis, an equal share of rows on each device."""
  if len(rows) % len(devices):
    raise ValueError(f"a batch of {len(rows)} rows cannot be split evenly over {len(devices)} devices: use a "
                     f"--batch-size that is a multiple of {len(devices)}")
  return Tensor(rows, device=devices[0]).shard(devices, axis=0)


def _replicate_rope(model, devices: Devices) -> None:
  model.rope.cos = model.rope.cos.shard(devices).realize()
  model.rope.sin = model.rope.sin.shard(devices).realize()
