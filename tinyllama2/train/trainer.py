"""The training loop: AdamW with warmup + cosine decay, clipping, gradient accumulation, evaluation, checkpoints.

A step is two compiled graphs: `micro` (forward, backward, add the gradients into accumulators), run grad_accum
times, then `apply` (average, clip, AdamW update, zero the accumulators). What is minimised is an `Objective` over
rows of a `Dataset`: next-token prediction by default (`LanguageModeling`), a reward model, DPO, PPO or GRPO for
alignment. Checkpoints hold the trainable tensors, the optimizer moments, the step, the batch order's position and
the RNG counter, so `resume()` continues with exactly the losses of an uninterrupted run. A checkpoint is written to
a temporary folder, renamed into place, and only then named in `latest`: a kill at any moment leaves the previous
checkpoint readable.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tinygrad import Context, Tensor, TinyJit, dtypes
from tinygrad.nn.optim import AdamW, OptimizerGroup

from ..checkpoint import safetensors
from ..config import ModelArgs
from ..fileio import atomic_write, write_text
from ..model import Transformer
from ..parallel import shard_rows
from ..runtime import rng
from .data import BatchOrder
from .losses import lm_loss


@dataclass
class TrainConfig:
  out_dir: str
  max_steps: int = 1000
  batch_size: int = 8
  grad_accum: int = 1
  lr: float = 1e-3
  min_lr: float = 1e-4           # the cosine schedule ends here
  warmup_steps: int = 100
  weight_decay: float = 0.1      # not applied to norm weights
  beta1: float = 0.9
  beta2: float = 0.95
  grad_clip: float = 1.0         # max global gradient norm; 0 = off
  eval_every: int = 100
  eval_batches: int = 8
  save_every: int = 100
  keep_checkpoints: int = 2
  seed: int = 0

  def validate(self) -> None:
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every", "keep_checkpoints"):
      if getattr(self, name) < 1: raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.lr <= 0 or self.min_lr < 0: raise ValueError(f"learning rates must be positive (lr={self.lr}, min_lr={self.min_lr})")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
      if getattr(self, name) < 0: raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def lr_at(step: int, c: TrainConfig) -> float:
  """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps (step counts from 0)."""
  if step < c.warmup_steps: return c.lr * (step + 1) / c.warmup_steps
  progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
  return c.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def available_memory() -> int | None:
  """Bytes of memory this process could still get (MemAvailable + free swap), None where unknown."""
  try: info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
  except OSError: return None
  try: return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
  except (KeyError, ValueError, IndexError): return None


def training_memory(args: ModelArgs, batch_size: int, seq_len: int) -> int:
  """A lower bound on the bytes one training micro-step holds: every layer's attention probabilities
  [batch, heads, seq, seq] float32 (kept for the backward pass) and the logits with their gradient."""
  return 4 * batch_size * seq_len * (args.n_layers * args.n_heads * seq_len + 2 * args.vocab_size)


def check_training_memory(args: ModelArgs, batch_size: int, seq_len: int, device: str) -> None:
  """On the CPU, refuse a batch that cannot fit before anything is allocated (instead of an out-of-memory error
  after minutes of tokenizing and compiling)."""
  if not device.startswith("CPU") or (avail := available_memory()) is None: return
  need = training_memory(args, batch_size, seq_len)
  if need <= avail: return
  fits = next((n for n in (2 ** k for k in range(20, 2, -1)) if training_memory(args, batch_size, n) <= avail), None)
  hint = f"use --seq-len {fits} or less (or a smaller --batch-size)" if fits else "use a smaller --batch-size"
  raise MemoryError(f"--seq-len {seq_len} with --batch-size {batch_size} needs at least {need / 2**30:.1f} GiB for "
                    f"training, but {avail / 2**30:.1f} GiB of memory is available; {hint}")


def _no_decay(name: str) -> bool: return name.endswith(("norm.weight", "bias"))


class Dataset(Protocol):
  """Training rows: `rows(index)` gives the arrays of those rows, in the order the objective takes them."""
  def __len__(self) -> int: ...
  @property
  def seq_len(self) -> int: ...          # the longest sequence the model sees
  @property
  def tokens_per_row(self) -> int: ...   # for tokens/s
  def rows(self, index: np.ndarray) -> tuple[np.ndarray, ...]: ...


class Objective(Protocol):
  """Maps a batch (the tensors of Dataset.rows) to [1 + len(metrics)] float32: the loss to minimise first, then
  the values logged under `metrics`' names (averaged over the micro-batches of a step)."""
  metrics: tuple[str, ...]
  def __call__(self, *batch: Tensor) -> Tensor: ...


class LanguageModeling:
  """Next-token cross-entropy over the weighted targets of `Blocks` (pretraining, SFT)."""
  metrics: tuple[str, ...] = ()

  def __init__(self, model: Transformer): self.model = model

  def __call__(self, tokens: Tensor, weights: Tensor) -> Tensor:
    return lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:], weights).reshape(1)


class Trainer:
  """Trains `params` (name -> tensor, all else frozen) of `model` on `train`, evaluating on `val`; the objective
  defaults to language modeling on `Blocks`."""

  def __init__(self, model: Transformer, params: dict[str, Tensor], train: Dataset, val: Dataset | None,
               config: TrainConfig, on_save: Callable[[Path], None] | None = None, objective: Objective | None = None):
    config.validate()
    if not params: raise ValueError("nothing to train: every parameter is frozen")
    if train.seq_len > model.max_seq_len: raise ValueError(f"--seq-len {train.seq_len} exceeds the model's {model.max_seq_len}")
    self.model, self.params, self.train_data, self.val_data, self.cfg = model, params, train, val, config
    self.objective = objective or LanguageModeling(model)
    self.out = Path(config.out_dir)
    self.on_save = on_save
    self.step = 0
    self.order = BatchOrder(len(train), config.batch_size, config.seed)
    for t in params.values(): t.is_param_(True)
    decay = [t for n, t in params.items() if not _no_decay(n)]
    plain = [t for n, t in params.items() if _no_decay(n)]
    opts = [AdamW(group, lr=config.lr, b1=config.beta1, b2=config.beta2, weight_decay=wd)
            for group, wd in ((decay, config.weight_decay), (plain, 0.0)) if group]
    self.opt = OptimizerGroup(*opts)
    self.accum = [Tensor.zeros(t.shape, dtype=dtypes.float32, device=t.device).contiguous().realize() for t in params.values()]
    self._micro = TinyJit(self._micro_step)
    self._apply = TinyJit(self._apply_step)
    self._eval = TinyJit(self._eval_step)
    self.device = model.device
    rng.seed(self.device, config.seed)

  # ---- compiled pieces --------------------------------------------------------------------------
  def _micro_step(self, *batch: Tensor) -> Tensor:
    with Context(TRAINING=1):
      values = self.objective(*batch)
      grads = values[0].gradient(*self.params.values())
      for acc, g in zip(self.accum, grads): acc.assign(acc + g.float())
      Tensor.realize(values, *self.accum)
    return values

  def _apply_step(self) -> Tensor:
    with Context(TRAINING=1):
      grads = [acc / self.cfg.grad_accum for acc in self.accum]
      norm = Tensor.stack(*[g.square().sum() for g in grads]).sum().sqrt()
      scale = (self.cfg.grad_clip / (norm + 1e-6)).minimum(1.0) if self.cfg.grad_clip > 0 else Tensor(1.0, device=norm.device)
      for t, g in zip(self.params.values(), grads): t.grad = (g * scale).cast(t.dtype)
      updates = self.opt.schedule_step()
      for acc in self.accum: acc.assign(Tensor.zeros_like(acc))
      Tensor.realize(norm, *updates, *self.accum)
    return norm

  def _eval_step(self, *batch: Tensor) -> Tensor: return self.objective(*batch).realize()

  # ---- loop -------------------------------------------------------------------------------------
  def _batch(self, data: Dataset, rows: np.ndarray) -> list[Tensor]:
    """The rows on the device, or split over the devices of a data-parallel model (parallel.replicate_model)."""
    if isinstance(self.device, tuple): return [shard_rows(a, self.device) for a in data.rows(rows)]
    return [Tensor(a, device=self.device) for a in data.rows(rows)]

  def _named(self, values: list[np.ndarray], prefix: str = "") -> dict[str, float]:
    mean = np.mean(values, axis=0)
    return {prefix + name: float(v) for name, v in zip(("loss", *self.objective.metrics), mean)}

  def set_data(self, train: Dataset, seed: int) -> None:
    """Train on new rows from now on (RL: each iteration's rollouts), in a shuffled order drawn from `seed`."""
    self.train_data, self.order = train, BatchOrder(len(train), self.cfg.batch_size, seed)

  def set_lr(self, lr: float) -> None:
    for o in self.opt.optimizers: o.lr.assign(Tensor([lr], dtype=o.lr.dtype, device=o.lr.device)).realize()

  def train_step(self) -> dict:
    lr = lr_at(self.step, self.cfg)
    self.set_lr(lr)
    values = [self._micro(*self._batch(self.train_data, self.order.next())).numpy() for _ in range(self.cfg.grad_accum)]
    norm = self._apply().item()
    self.step += 1
    return {"step": self.step, **self._named(values), "lr": lr, "grad_norm": norm}

  def evaluate(self) -> dict[str, float]:
    """The objective's loss and metrics (`val_loss`, `val_<metric>`) averaged over the first eval_batches batches of
    the held-out set, in order so runs are comparable (a set smaller than a batch is repeated to fill one)."""
    data, b = self.val_data, self.cfg.batch_size
    if data is None or len(data) == 0: return {"val_loss": float("nan")}
    n = max(1, min(self.cfg.eval_batches, len(data) // b))
    return self._named([self._eval(*self._batch(data, np.arange(i * b, (i + 1) * b) % len(data))).numpy()
                        for i in range(n)], prefix="val_")

  def fit(self, progress: bool = True) -> list[dict]:
    """Train from the current step to max_steps; returns the per-step records of this call."""
    from tqdm import tqdm
    records: list[dict] = []
    tokens_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.train_data.tokens_per_row
    bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", disable=not progress)
    while self.step < self.cfg.max_steps:
      t0 = time.perf_counter()
      rec = self.train_step()
      rec["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
      if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps:
        rec.update(self.evaluate())
        if isinstance(self.objective, LanguageModeling): rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
      records.append(rec)
      self.log(rec)
      bar.update(1)
      bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                      **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
      if self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps: self.save_checkpoint()
    bar.close()
    self.plot()
    return records

  # ---- logs -------------------------------------------------------------------------------------
  @property
  def metrics_path(self) -> Path: return self.out / "metrics.jsonl"

  def log(self, rec: dict) -> None:
    self.out.mkdir(parents=True, exist_ok=True)
    with open(self.metrics_path, "a") as f: f.write(json.dumps(rec) + "\n")

  def plot(self) -> Path | None:
    """loss.png from metrics.jsonl when matplotlib is installed (an optional extra)."""
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
    except ImportError: return None
    rows = read_metrics(self.metrics_path)
    if not rows: return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=0.8)
    ev = [r for r in rows if "val_loss" in r]
    if ev: ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="held-out loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    path = self.out / "loss.png"
    with atomic_write(path) as f: fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path

  # ---- checkpoints ------------------------------------------------------------------------------
  @property
  def ckpt_root(self) -> Path: return self.out / "checkpoints"

  def _state_tensors(self) -> dict[str, Tensor]:
    out = {f"param.{n}": t for n, t in self.params.items()}
    for k, o in enumerate(self.opt.optimizers):
      out[f"opt{k}.b1_t"], out[f"opt{k}.b2_t"] = o.b1_t, o.b2_t
      for i, (m, v) in enumerate(zip(o.m, o.v)): out[f"opt{k}.m.{i}"], out[f"opt{k}.v.{i}"] = m, v
    return out

  def save_checkpoint(self) -> Path:
    root = self.ckpt_root
    final = root / f"step-{self.step:08d}"
    tmp = root / f".tmp-step-{self.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.save({k: t.numpy() for k, t in self._state_tensors().items()}, tmp / "state.safetensors")
    state_rng = rng.rng_state(self.device)
    state = {"step": self.step, "data": self.order.state(), "rng_seed": state_rng["seed"],
             "rng_counter": state_rng["counter"], "config": asdict(self.cfg)}
    write_text(tmp / "trainer.json", json.dumps(state, indent=2))
    if final.exists(): shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_text(root / "latest", final.name)
    if self.on_save: self.on_save(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-self.cfg.keep_checkpoints]:
      shutil.rmtree(old, ignore_errors=True)
    return final

  def resume(self) -> bool:
    """Load the latest complete checkpoint in out_dir; False when there is none."""
    ckpt = latest_checkpoint(self.ckpt_root)
    if ckpt is None: return False
    state = json.loads((ckpt / "trainer.json").read_text())
    tensors = safetensors.load(ckpt / "state.safetensors")
    expected = self._state_tensors()
    if set(tensors) != set(expected):
      raise ValueError(f"{ckpt}: checkpoint does not match this model/optimizer (different trainable parameters?)")
    for name, t in expected.items():
      if tuple(tensors[name].shape) != tuple(t.shape):
        raise ValueError(f"{ckpt}: {name} has shape {tensors[name].shape}, expected {tuple(t.shape)}")
      t.assign(Tensor(np.array(tensors[name]), device=t.device).cast(t.dtype)).realize()
    self.step = int(state["step"])
    self.order.load_state(state["data"])
    rng.set_rng_state(self.device, {"seed": state["rng_seed"], "counter": state["rng_counter"]})
    # the log keeps only what the resumed run will not write again
    rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
    write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    return True


def read_metrics(path: Path) -> list[dict]:
  if not path.is_file(): return []
  rows = []
  for line in path.read_text().splitlines():
    try: rows.append(json.loads(line))
    except json.JSONDecodeError: pass   # a line cut short by a kill
  return rows


def latest_checkpoint(root: Path) -> Path | None:
  """The folder named in `latest`, else the newest complete step-* folder (one holding trainer.json)."""
  named = root / "latest"
  if named.is_file():
    p = root / named.read_text().strip()
    if (p / "trainer.json").is_file() and (p / "state.safetensors").is_file(): return p
  done = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
  return done[-1] if done else None


def _fsync_dir(path: Path) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)
  except OSError: pass
