"""Saving and restoring tinygrad's random-number state, so a resumed training run draws what it would have drawn.

tinygrad 0.14 internals used: `Tensor._seed`, `Tensor._device_rng_counters` and `Tensor._next_counter` (the
per-device counter that `Tensor.rand` advances; `manual_seed` alone resets it to zero).
"""
from __future__ import annotations

from tinygrad import Tensor, dtypes


def seed(device: str, value: int) -> None:
  """Seed tinygrad's random stream and create `device`'s counter now, so a checkpoint can hold it from the start."""
  Tensor.manual_seed(value)
  Tensor._next_counter(device, 0)


def rng_state(device: str) -> dict:
  """{"seed", "counter"} of `device`'s random stream (JSON-serializable)."""
  return {"seed": Tensor._seed, "counter": Tensor._device_rng_counters[device].numpy().tolist()}


def set_rng_state(device: str, state: dict) -> None:
  Tensor.manual_seed(state["seed"])
  Tensor._next_counter(device, 0)
  Tensor._device_rng_counters[device].assign(Tensor(state["counter"], dtype=dtypes.uint32, device=device)).realize()
