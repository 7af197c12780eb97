"""Training: gradients against finite differences, a learnable task, schedule, accumulation, data, resume after SIGKILL."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tinygrad import Context, Tensor

import reference_numpy
from conftest import LLAMA_TOK, TOK512, need
from tinyllama2 import ModelArgs, Transformer
from tinyllama2.tokenizer import Tokenizer
from tinyllama2.train import Blocks, TrainConfig, Trainer, lm_loss, lr_at, sft_blocks, text_blocks
from tinyllama2.train.data import BatchOrder

HERE = Path(__file__).parent


def tiny_model(vocab=13, dim=16, layers=2, heads=4, kv=2, hidden=24, seq=16, seed=0) -> Transformer:
  args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, vocab_size=vocab, hidden_dim=hidden,
                   max_position_embeddings=seq)
  m = Transformer(args, max_seq_len=seq)
  m.init_random(seed, std=0.3)
  return m


def numpy_loss(weights: dict, args, tokens: np.ndarray) -> float:
  """Mean next-token cross-entropy of the float64 numpy reference model."""
  total = 0.0
  for row in tokens:
    logits = reference_numpy.forward(weights, args, row[:-1].tolist())
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total += -logp[np.arange(len(row) - 1), row[1:]].mean()
  return total / len(tokens)


def test_gradients_match_finite_differences():
  m = tiny_model()
  tokens = np.random.default_rng(0).integers(0, 13, size=(2, 9))
  params = m.state_dict()
  with Context(TRAINING=1):
    d = m.device
    loss = lm_loss(m(Tensor(tokens[:, :-1], device=d)), Tensor(tokens[:, 1:], device=d), Tensor.ones(2, 8, device=d))
    grads = dict(zip(params, [g.numpy() for g in loss.gradient(*params.values())]))
  w64 = {k: v.numpy().astype(np.float64) for k, v in params.items()}
  np.testing.assert_allclose(loss.item(), numpy_loss(w64, m.args, tokens), rtol=1e-5)
  rng = np.random.default_rng(1)
  eps = 1e-5
  for name in ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
               "layers.1.attention.wv.weight", "layers.1.attention.wo.weight", "layers.0.feed_forward.w1.weight",
               "layers.1.feed_forward.w2.weight", "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
               "layers.1.ffn_norm.weight", "norm.weight", "output.weight"]:
    for _ in range(3):   # a handful of entries per kind of tensor
      idx = tuple(rng.integers(0, s) for s in w64[name].shape)
      plus, minus = dict(w64), dict(w64)
      plus[name], minus[name] = w64[name].copy(), w64[name].copy()
      plus[name][idx] += eps
      minus[name][idx] -= eps
      fd = (numpy_loss(plus, m.args, tokens) - numpy_loss(minus, m.args, tokens)) / (2 * eps)
      assert abs(grads[name][idx] - fd) <= 1e-4 + 2e-3 * abs(fd), (name, idx, grads[name][idx], fd)


def test_learns_a_copy_task(tmp_path):
  """Rows are [BOS] s s with s random: the second half is predictable, and the loss on it drops to ~0."""
  m = tiny_model(vocab=16, dim=32, layers=2, heads=4, kv=2, hidden=64, seq=16)
  rng = np.random.default_rng(0)
  s = rng.integers(3, 16, size=(256, 6))
  tokens = np.concatenate([np.ones((256, 1), int), s, s], 1).astype(np.int32)   # 13 tokens
  weights = np.zeros((256, 12), np.float32)
  weights[:, 6:] = 1   # targets that copy
  train, val = Blocks(tokens, weights).split(0.1)
  cfg = TrainConfig(out_dir=str(tmp_path), max_steps=120, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                    weight_decay=0.0, eval_every=120, save_every=1000)
  recs = Trainer(m, m.state_dict(), train, val, cfg).fit(progress=False)
  assert recs[0]["loss"] > 2.0
  assert recs[-1]["val_loss"] < 0.1, recs[-1]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 121)) and "val_ppl" in rows[-1]
  try: import matplotlib  # noqa: F401  (optional extra: the loss curve)
  except ImportError: return
  assert (tmp_path / "loss.png").stat().st_size > 1000


def test_lr_schedule_is_warmup_then_cosine():
  c = TrainConfig(out_dir="x", max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
  assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
  assert lr_at(10, c) == pytest.approx(1.0)
  assert lr_at(60, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
  assert lr_at(110, c) == pytest.approx(0.1)


def test_grad_accumulation_equals_a_larger_batch(tmp_path):
  rng = np.random.default_rng(3)
  data = Blocks(rng.integers(0, 13, size=(8, 9)).astype(np.int32), np.ones((8, 8), np.float32))
  results = []
  for batch, accum in ((8, 1), (4, 2)):
    m = tiny_model(seed=5)
    t = Trainer(m, m.state_dict(), data, None, TrainConfig(out_dir=str(tmp_path / str(accum)), max_steps=1, batch_size=batch,
                                                           grad_accum=accum, warmup_steps=1, grad_clip=0.5, save_every=10))
    rows = iter([np.arange(8)] if accum == 1 else [np.arange(4), np.arange(4, 8)])
    t.order = type("Fixed", (), {"next": lambda self: next(rows)})()
    rec = t.train_step()
    results.append((rec["grad_norm"], {k: v.numpy() for k, v in m.state_dict().items()}))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for k in results[0][1]: np.testing.assert_allclose(results[0][1][k], results[1][1][k], atol=1e-6)


def test_weight_decay_skips_norms(tmp_path):
  m = tiny_model()
  t = Trainer(m, m.state_dict(), Blocks(np.zeros((4, 9), np.int32), np.ones((4, 8), np.float32)), None,
              TrainConfig(out_dir=str(tmp_path), batch_size=4, weight_decay=0.5))
  decayed = {id(p) for o in t.opt.optimizers if o.wd > 0 for p in o.params}
  for name, p in m.state_dict().items(): assert (id(p) in decayed) == (not name.endswith("norm.weight")), name


def test_batch_order_is_seeded_and_resumable():
  a = BatchOrder(10, 3, seed=7)
  seen = [a.next() for _ in range(4)]
  assert sorted(np.concatenate(seen[:3]).tolist()) == sorted(set(np.concatenate(seen[:3]).tolist()))   # no repeats in an epoch
  b = BatchOrder(10, 3, seed=7)
  for _ in range(2): b.next()
  c = BatchOrder(10, 3, seed=7)
  c.load_state(b.state())
  np.testing.assert_array_equal(c.next(), seen[2])
  np.testing.assert_array_equal(c.next(), seen[3])   # next epoch, reshuffled the same way


# ---- data ---------------------------------------------------------------------------------------
def test_text_blocks_wrap_documents_in_bos_eos(tmp_path, monkeypatch):
  need(TOK512)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  tok = Tokenizer(TOK512)
  f = tmp_path / "c.txt"
  f.write_text("Once upon a time.<|endoftext|>The cat sat.<|endoftext|>")
  blocks = text_blocks([f], tok, seq_len=4)
  stream = [1, *tok.encode("Once upon a time.", bos=False), 2, 1, *tok.encode("The cat sat.", bos=False), 2]
  n = (len(stream) - 1) // 4
  assert blocks.tokens.tolist() == [stream[i * 4:i * 4 + 5] for i in range(n)]
  assert list((tmp_path / "cache").rglob("*.npy")), "tokens are cached on disk"
  assert text_blocks([f], tok, seq_len=4).tokens.tolist() == blocks.tokens.tolist()


def test_sft_weights_cover_exactly_the_answers(tmp_path):
  need(LLAMA_TOK)
  tok = Tokenizer(LLAMA_TOK)
  recs = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
          {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]}]
  f = tmp_path / "d.json"
  f.write_text(json.dumps(recs))
  b = sft_blocks(f, tok, seq_len=64)
  # Meta's format built by hand: [BOS] [INST] q [/INST] a [EOS] per turn; the answers and their EOS are weighted
  turn = lambda q, a: ([1] + tok.sp.EncodeAsIds(f"[INST] {q} [/INST] {a} ") + [2])  # noqa: E731
  for row, w, turns in zip(b.tokens, b.weights, [[("Name a color.", "Blue.")], [("Hi", "Hello!"), ("Bye", "See you.")]]):
    ids = sum((turn(q, a) for q, a in turns), [])
    assert row[:len(ids)].tolist() == ids
    weighted = [int(t) for t, wt in zip(row[1:], w) if wt]
    assert tok.decode(weighted).replace("  ", " ").split() == " ".join(a for _, a in turns).split()
    assert weighted.count(2) == len(turns)


def test_malformed_record_error_names_it(tmp_path):
  need(TOK512)
  f = tmp_path / "bad.json"
  f.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "only"}]))
  with pytest.raises(ValueError, match=r"bad.json record 1.*'output'"):
    sft_blocks(f, Tokenizer(TOK512), seq_len=32)
  f.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"): sft_blocks(f, Tokenizer(TOK512), seq_len=32)


# ---- resume after SIGKILL -----------------------------------------------------------------------
def _run(out: Path, steps: int, resume: bool) -> subprocess.Popen:
  cmd = [sys.executable, str(HERE / "train_worker.py"), str(out), str(steps)] + (["--resume"] if resume else [])
  return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(HERE)})


def _losses(out: Path) -> list[float]:
  return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_losses(tmp_path):
  steps = 8
  full = _run(tmp_path / "full", steps, resume=False)
  assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]
  kill_at = random.Random().randint(3, steps - 2)
  run = _run(tmp_path / "killed", steps, resume=False)
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and run.poll() is None:
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at: break
    time.sleep(0.02)
  run.send_signal(signal.SIGKILL)
  run.wait()
  resumed = _run(tmp_path / "killed", steps, resume=True)
  assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
  assert _losses(tmp_path / "killed") == _losses(tmp_path / "full"), f"killed at step {kill_at}"


def test_exporting_over_a_model_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
  """A model folder is replaced by rename: a kill between moving the old one aside and moving the new one in
  leaves the old one beside the output (one of our temp folders), never nothing."""
  from tinyllama2.checkpoint import load_checkpoint
  from tinyllama2.fileio import is_our_temp
  from tinyllama2.train.recipes import export_hf
  args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, hidden_dim=24)
  first, second = Transformer(args, max_seq_len=8), Transformer(args, max_seq_len=8)
  first.init_random(seed=1)
  second.init_random(seed=2)
  export_hf(first, tmp_path / "model", None)
  export_hf(second, tmp_path / "model", None)
  got = load_checkpoint(tmp_path / "model").weights["norm.weight"]
  np.testing.assert_array_equal(got, second.norm.weight.numpy())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # nothing left behind
  renames = []
  def killed_after_moving_aside(self, target):
    renames.append(target)
    if len(renames) == 2: raise KeyboardInterrupt   # killed before the new model moves in
    os.rename(self, target)
  monkeypatch.setattr(Path, "rename", killed_after_moving_aside)
  with pytest.raises(KeyboardInterrupt): export_hf(first, tmp_path / "model", None)
  monkeypatch.undo()
  aside = [p for p in tmp_path.iterdir() if is_our_temp(p)]
  assert len(aside) == 1 and (aside[0] / "model.safetensors").is_file()   # the previous model survived
