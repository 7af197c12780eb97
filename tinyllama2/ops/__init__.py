"""The backend boundary: one function per hot operation of the Llama, choosing what computes it.

Each function takes layers (which say what a kernel would read: `layer.kernel_weights`) and activations, and
picks, by the rules in `route` and `attention` and nowhere else, a hand-written kernel of `ops.cpu` (tinygrad's
clang CPU backend) or `ops.gpu` (devices with work groups and local memory), or tinygrad's own graph of the same
math. Both kernel modules implement one contract — `project`, `project_swiglu` (one row, or the few rows of a
batched decode step), `project_rows`, `project_rows_swiglu` (several rows), `cached_attention`, `decode_attention`
(one sequence), `decode_attention_rows`, `embedding_rows` (a batched decode step), and the data `WEIGHT_KINDS`,
`CACHE_DTYPES` — and return None for a shape they cannot split, which falls back to tinygrad's graph.
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator, Sequence

from tinygrad import Context, Tensor, UOp, dtypes
from tinygrad.helpers import TRAINING

from . import cpu, gpu


def grad_boundary(y: Tensor) -> Tensor:
  """When training, materialize y and the gradient arriving at y: otherwise tinygrad 0.14 fuses producers into
  their consumers' reductions and recomputes them per element (a matmul inside each weight-gradient reduction,
  the softmax's exp inside probs @ values), which makes a training step ~100x slower."""
  return y.contiguous().contiguous_backward() if TRAINING else y


def silu(x: Tensor) -> Tensor:
  """x·sigmoid(x). When training, the sigmoid and the derivative are stored once instead of being recomputed
  (with their exp) inside each weight-gradient reduction: same values, same gradient."""
  if not TRAINING: return x.silu()
  sig = x.sigmoid().contiguous().detach()
  dsilu = (sig * (1 + x.detach() * (1 - sig))).contiguous().detach()
  return x.detach() * sig + (x - x.detach()) * dsilu


@contextlib.contextmanager
def training_graph() -> Iterator[None]:
  """Forward passes built meanwhile use the graph a training step uses (tinygrad's kernels, dropout active), for
  values that must equal the training forward's: DPO's reference log-probs, RL rollout statistics, reward scores."""
  with Context(TRAINING=1): yield


def backend(device) -> ModuleType | None:
  """The kernel module for `device` (cpu or gpu); None where only tinygrad's graph runs, and while training
  (the kernels have no backward)."""
  if TRAINING or not isinstance(device, str): return None
  if cpu.available(device): return cpu
  if gpu.available(device): return gpu
  return None


def _rows(x: Tensor) -> int:
  """Rows of x (all but the last axis), a symbolic axis counting as several."""
  rows = 1
  for s in x.shape[:-1]: rows *= s if isinstance(s, int) else 2
  return rows


def route(x: Tensor, layers: Sequence) -> tuple[str, ModuleType, list] | None:
  """How a product of x with `layers` (read together) is computed: ("row", kernels, weights) for one row (decoding
  a token), ("rows", ...) for several rows with concrete shapes (prefill; the CPU only, where tinygrad's generated
  matmul reaches ~10 GFLOP/s and the tiled kernel 60-110), None for tinygrad's graph: layers without kernel
  weights (LoRA), of different kinds or of a kind the kernels do not read, training, other devices."""
  kernels = backend(x.device)
  if kernels is None: return None
  weights = [layer.kernel_weights for layer in layers]
  if any(w is None for w in weights) or len({w.kind for w in weights}) != 1: return None
  if weights[0].kind not in kernels.WEIGHT_KINDS: return None
  if _rows(x) == 1: return "row", kernels, weights
  if kernels is cpu and all(isinstance(s, int) for s in x.shape): return "rows", kernels, weights
  return None


def linear(x: Tensor, layer) -> Tensor:
  """x @ W.T of one layer."""
  if (chosen := route(x, [layer])) is not None:
    how, kernels, (weights,) = chosen
    y = kernels.project(x, [weights]) if how == "row" else kernels.project_rows(x, weights)
    if y is not None: return y
  return layer.forward(x)


def qkv(x: Tensor, wq, wk, wv) -> tuple[Tensor, Tensor, Tensor]:
  """The q, k and v projections of x; one kernel for the three when decoding a row."""
  if (chosen := route(x, (wq, wk, wv))) is not None and chosen[0] == "row":
    _, kernels, weights = chosen
    if (y := kernels.project(x, weights)) is not None:
      q_out, kv_out = weights[0].out_features, weights[1].out_features
      return y[..., :q_out], y[..., q_out:q_out + kv_out], y[..., q_out + kv_out:]
  return wq(x), wk(x), wv(x)


def gate_up_swiglu(x: Tensor, gate, up) -> Tensor:
  """silu(gate(x)) * up(x), the input of SwiGLU's down projection; gate and up read in one kernel where they allow."""
  if (chosen := route(x, (gate, up))) is not None:
    how, kernels, (g, u) = chosen
    y = kernels.project_swiglu(x, g, u) if how == "row" else kernels.project_rows_swiglu(x, g, u)
    if y is not None: return y
  return silu(gate(x)) * up(x)


def attention(q: Tensor, cache_k: Tensor, cache_v: Tensor, start_pos: int | UOp, key_bias: Tensor | None,
              first_row: int | UOp = 0) -> Tensor | None:
  """Causal attention of q [B, T, H, D] (RoPE applied, its keys and values already in cache rows first_row..) over
  the first start_pos + T cache positions, in one kernel module's kernels, in q's dtype; None where tinygrad's graph
  computes it (the model's own formula)."""
  kernels = backend(q.device)
  if kernels is None or not all(isinstance(s, int) for s in q.shape) or cache_k.dtype not in kernels.CACHE_DTYPES:
    return None
  return kernels.cached_attention(q, cache_k, cache_v, start_pos, key_bias, first_row)


def inference_activations(x: Tensor) -> Tensor:
  """x in the dtype activations flow in on its device when decoding or prefilling. On the CPU, half weights are read
  as half but activations stay float32, as in llama.cpp: the C backend has no vector half arithmetic, so half
  activations would only add a conversion to every element of every op."""
  return x.float() if x.dtype == dtypes.float16 and backend(x.device) is cpu else x
