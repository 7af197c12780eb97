#!/usr/bin/env python3
"""GB/s of the one-row GPU kernels (tinyllama2/ops/gpu.py) for llama2-7b's decode shapes, per schedule,
beside tinygrad's generic x @ W.T:  DEV=CUDA python bench/gpu_matvec.py

Each timing runs one captured graph over enough distinct copies of the weight that they cannot sit in the L2
cache, and counts the weight bytes read.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tinygrad import Device, Tensor, TinyJit  # noqa: E402

from tinyllama2.ops import gpu as gpu_kernels  # noqa: E402
from tinyllama2.quantize import QuantLinear  # noqa: E402

SHAPES = {"qo": (4096, 4096), "down": (4096, 11008), "gate_up": (11008, 4096), "head": (32000, 4096)}
SCHEDULES = [gpu_kernels.MatvecSchedule(t, r, p) for t, r, p in [(32, 4, 1), (32, 8, 1), (32, 2, 4), (32, 4, 2), (16, 8, 2)]]


def _time(fn, n_bytes: int, reps: int = 10) -> float:
  for _ in range(3): fn()
  Device[Device.DEFAULT].synchronize()
  t0 = time.perf_counter()
  for _ in range(reps): fn()
  Device[Device.DEFAULT].synchronize()
  return n_bytes * reps / (time.perf_counter() - t0) / 1e9


def _layers(kind: str, N: int, K: int, copies: int) -> list:
  out = []
  for _ in range(copies):
    w = (Tensor.rand(N, K) - 0.5).realize()
    out.append(w.half().realize() if kind == "f16" else QuantLinear.from_float(w, "int8" if kind == "q8_0" else "int4"))
  return out


def _call(kind: str, layer, x: Tensor, generic: bool, up=None, fused: dict | None = None) -> Tensor:
  """The product as the generic graph or as our kernel; `fused`: the norm= or residual= our kernel fuses in."""
  fused = fused or {}
  if kind == "f16":
    if generic: return (x @ layer.T) if up is None else (x @ layer.T).silu() * (x @ up.T)
    return gpu_kernels.matvec_concat(x, [layer], **fused) if up is None else gpu_kernels.matvec_swiglu(x, layer, up, **fused)
  if generic: return x @ layer.dequantize().T
  return gpu_kernels.matvec_blocks(layer.block_kind, x, [(layer.packed, layer.scale)], **fused)


def _fusion(name: str, N: int, K: int) -> dict:
  """What the fused decode step adds to this product: the norm before q/k/v-like, gate/up and head products,
  the residual after the others."""
  if name in ("gate_up", "head"): return {"norm": ((Tensor.rand(K) + 0.5).half().realize(), 1e-5)}
  return {"residual": Tensor.rand(N).half().realize()}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kind", action="append", choices=["f16", "q8_0", "q4_0"], help="weight kinds (default all)")
  p.add_argument("--bytes", type=float, default=512e6, help="bytes of weights per timed graph (more than L2)")
  p.add_argument("--fused", action="store_true", help="only the default schedule, without and with the norm or "
                 "residual the fused decode step adds (what the fusion costs)")
  a = p.parse_args()
  x = Tensor.rand(1, 1, 4096).half().realize()
  x_wide = Tensor.rand(1, 1, 11008).half().realize()
  print("kind | shape | schedule | GB/s")
  print("--- | --- | --- | ---")
  for kind in a.kind or ["f16", "q8_0", "q4_0"]:
    for name, (N, K) in SHAPES.items():
      swiglu = name == "gate_up" and kind == "f16"
      bytes_per = N * K * {"f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}[kind] * (2 if swiglu else 1)
      copies = max(2, int(a.bytes // bytes_per))
      layers = _layers(kind, N, K, copies * (2 if swiglu else 1))
      ups = layers[copies:] if swiglu else [None] * copies
      xin = x_wide if K == 11008 else x
      default = gpu_kernels.SCHEDULES["dense" if kind == "f16" else "blocks"]
      runs = [(default, {}), (default, _fusion(name, N, K))] if a.fused else [(None, {})] + [(s, {}) for s in SCHEDULES]
      for sched, fused in runs:
        if sched is not None: gpu_kernels.set_schedule("dense" if kind == "f16" else "blocks", sched)
        if _call(kind, layers[0], xin, sched is None, ups[0], fused) is None: continue
        fn = TinyJit(lambda: Tensor.stack(*[_call(kind, lay, xin, sched is None, up, fused).reshape(-1)
                                            for lay, up in zip(layers, ups)]).realize())
        gbs = _time(fn, int(bytes_per * copies))
        label = "tinygrad x @ W.T" if sched is None else f"{sched.threads}t x {sched.rows}r x {sched.rows_per_thread}"
        print(f"{kind} | {name} {N}x{K} | {label}{' + ' + ', '.join(fused) if fused else ''} | {gbs:.0f}", flush=True)
      layers.clear()
  for kind, sched in gpu_kernels.SCHEDULES.items(): gpu_kernels.set_schedule(kind, sched)


if __name__ == "__main__":
  main()
