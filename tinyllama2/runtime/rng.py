"""Saving and restoring tinygrad's random-number state, so a resumed training run draws what it would have drawn.

tinygrad 0.14 internals used: `Tensor._seed`, `Tensor._device_rng_counters` and `Tensor._next_counter` (the
per-device counter that `Tensor.rand` advances; `manual_seed` alone resets it to zero).
"""
from __future__ import annotations

from tinygrad import Tensor, dtypes

Device = str | tuple[str, ...]   # a sharded tensor draws from the stream of each of its devices


def _each(device: Device) -> tuple[str, ...]: return (device,) if isinstance(device, str) else tuple(device)


def seed(device: Device, value: int) -> None:
  """Seed tinygrad's random stream and create each device's counter now, so a checkpoint can hold it from the start."""
  Tensor.manual_seed(value)
  for d in _each(device): Tensor._next_counter(d, 0)


def rng_state(device: Device) -> dict:
  """{"seed", "counter"} of the random stream (JSON-serializable): a device's [low, high] counter, or a list of
  them for several devices."""
  counters = [Tensor._device_rng_counters[d].numpy().tolist() for d in _each(device)]
  return {"seed": Tensor._seed, "counter": counters[0] if isinstance(device, str) else counters}


def set_rng_state(device: Device, state: dict) -> None:
  counters = [state["counter"]] if isinstance(device, str) else state["counter"]
  counter_pairs = all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, int) for x in c) for c in counters)
  if len(counters) != len(_each(device)) or not counter_pairs:
    raise ValueError(f"the saved random state is for another number of devices than {len(_each(device))}: resume "
                     "on the devices the run was started on")
  Tensor.manual_seed(state["seed"])
  for d, counter in zip(_each(device), counters):
    Tensor._next_counter(d, 0)
    Tensor._device_rng_counters[d].assign(Tensor(counter, dtype=dtypes.uint32, device=d)).realize()
