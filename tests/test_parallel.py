"""Several devices (parallel.py), checked on CPU:0 and CPU:1 (this machine has one accelerator at most): tensor-
parallel logits and greedy generations equal one device's, for MHA and GQA, float32 and int8; data-parallel training
steps equal one device's with the same global batch."""
import json

import shutil

import numpy as np
import pytest

from conftest import SHARED, STORIES, TOK512, need
from tinyllama2 import DEFAULT_MODEL, Llama, Transformer
from tinyllama2.config import ModelArgs
from tinyllama2.parallel import parse_devices, shard_model
from tinyllama2.quantize import quantize_model
from tinyllama2.train.recipes import PretrainOptions, pretrain

TWO = ("CPU:0", "CPU:1")
SPLIT = parse_devices(TWO)   # as tinygrad names them (CPU:0 is "CPU")
MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=512, hidden_dim=128,
                max_position_embeddings=64)


def _random_mha(quantize: str | None) -> Llama:
  model = Transformer(MHA, max_seq_len=64)
  model.init_random(seed=3, std=0.1)
  if quantize: quantize_model(model, quantize)
  return Llama(model, None, slots=1)


def _pair(kind: str, quantize: str | None) -> tuple[Llama, Llama]:
  """The same model on one device and split over two."""
  if kind == "mha":
    one, two = _random_mha(quantize), _random_mha(quantize)
    shard_model(two.model, TWO)
    return one, two
  need(STORIES, TOK512)
  load = lambda **kw: Llama.from_pretrained(STORIES, tokenizer=TOK512, quantize=quantize, slots=1, **kw)
  return load(), load(devices=TWO)


@pytest.mark.parametrize("devices,message", [
  ("CPU:0", "at least two devices"), ("CPU:0,CPU:0", "name a device twice"), ("CPU:0,NOPE", "no such device"),
  (["CPU:0", ""], "at least two devices")])
def test_bad_device_lists_are_one_line_errors(devices, message):
  with pytest.raises(ValueError, match=message) as e: parse_devices(devices)
  assert "\n" not in str(e.value)


def test_splits_must_keep_heads_whole():
  model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=512), max_seq_len=16)
  with pytest.raises(ValueError, match="4 devices cannot split the model's 2 key/value heads evenly"):
    shard_model(model, ("CPU:0", "CPU:1", "CPU:2", "CPU:3"))
  with pytest.raises(ValueError, match="device= or devices="):
    Llama.from_pretrained(DEFAULT_MODEL, device="CPU", devices=TWO)


@pytest.mark.slow
@pytest.mark.parametrize("kind,quantize", [("mha", None), ("mha", "int8"), ("gqa", None), ("gqa", "int8")])
def test_sharded_logits_equal_one_device(kind, quantize):
  one, two = _pair(kind, quantize)
  ids = [1, 403, 407, 261, 378, 44, 9, 260]
  ref = one.logits(ids)
  got = two.logits(ids)
  assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
  if kind == "gqa" and quantize: _check_placement(two.model)


def _check_placement(m) -> None:
  """q/k/v and gate/up split by output rows, wo and down by input columns (stories260K's down projection stays float:
  172 columns are no whole number of blocks), the head by vocabulary rows, the KV cache by key/value heads; norms and
  embeddings whole on each device."""
  axis, block = (lambda t: t.uop.axis), m.layers[0]
  assert all(t.device == SPLIT for t in m.state_dict().values())
  assert [axis(getattr(block.attention, n).packed) for n in ("wq", "wk", "wv", "wo")] == [0, 0, 0, 1]
  assert [axis(getattr(block.feed_forward, n).packed) for n in ("w1", "w3")] == [0, 0]
  assert axis(block.feed_forward.w2.weight) == 1
  assert axis(m.output.packed) == 0 and axis(m.tok_embeddings.weight) is None and axis(m.norm.weight) is None
  cache = m.new_caches(1)[0]
  assert cache.k.device == SPLIT and axis(cache.k) == 1


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_sharded_greedy_generation_equals_one_device(quantize, monkeypatch):
  """Through the engine (prefill graph, then decode steps). The one-device int8 reference runs with the CPU kernels
  off: they round activations to Q8_0 as llama.cpp does, while sharded tensors go through tinygrad's graph, which
  multiplies float activations by the dequantized blocks."""
  if quantize: monkeypatch.setattr("tinyllama2.ops.cpu.available", lambda device: False)
  one = Llama.from_pretrained(DEFAULT_MODEL, quantize=quantize, slots=1)
  two = Llama.from_pretrained(DEFAULT_MODEL, quantize=quantize, devices=TWO, slots=1)
  for prompt in ("Once upon a time", "The little dog"):
    a, b = one.generate(prompt, max_new_tokens=20), two.generate(prompt, max_new_tokens=20)
    assert b.tokens == a.tokens and b.text == a.text


def test_cli_generates_on_two_devices():
  """`tinyllama2 generate --devices` on the bundled model prints one device's greedy text."""
  import subprocess
  import sys
  from tinyllama2.devices import child_env
  cmd = [sys.executable, "-m", "tinyllama2.cli", "generate", "--model", str(DEFAULT_MODEL), "--prompt", "Once upon",
         "--max-new-tokens", "12", "--temperature", "0", "--json"]
  split = subprocess.run(cmd + ["--devices", "CPU:0,CPU:1"], capture_output=True, text=True, env=child_env("CPU"),
                         timeout=600)
  assert split.returncode == 0, split.stderr[-2000:]
  one = Llama.from_pretrained(DEFAULT_MODEL, slots=1).generate("Once upon", max_new_tokens=12)
  assert json.loads(split.stdout)["text"] == one.text
  both = subprocess.run(cmd + ["--devices", "CPU:0,CPU:0"], capture_output=True, text=True, env=child_env("CPU"),
                        timeout=600)
  assert both.returncode != 0 and "name a device twice" in both.stderr and "Traceback" not in both.stderr


# ---- data parallel --------------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
  src = SHARED / "corpora" / "tinyshakespeare_input.txt"
  need(src, TOK512)
  path = tmp_path / "corpus.txt"
  path.write_text(src.read_text()[:20000])
  return path


def _pretrain(out, corpus, devices=None, resume=False, batch_size=4) -> tuple:
  """Two steps of a one-block model from the same seed; (trainer, the loss of each step logged)."""
  o = PretrainOptions(data=[str(corpus)], out=str(out), dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      tokenizer=str(TOK512), seq_len=32, devices=devices, resume=resume,
                      train=dict(max_steps=2, batch_size=batch_size, eval_every=100, save_every=1, warmup_steps=1,
                                 lr=1e-3))
  trainer = pretrain(o, progress=False)
  return trainer, [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_data_parallel_pretraining_equals_one_device(tmp_path, corpus):
  """Same seed, same global batch of 4 rows (2 on each device): the loss of every step and the weights after them
  equal a one-device run's, the checkpoint holds the same tensors, and a run resumed on two devices continues
  exactly as the uninterrupted one."""
  from tinyllama2.checkpoint import safetensors
  one, one_losses = _pretrain(tmp_path / "one", corpus)
  two, two_losses = _pretrain(tmp_path / "two", corpus, devices="CPU:0,CPU:1")
  assert all(t.device == SPLIT for t in two.params.values())
  np.testing.assert_allclose(two_losses, one_losses, rtol=0, atol=1e-5)
  w1, w2 = one.model.state_dict(), two.model.state_dict()
  assert max(np.abs(w1[k].numpy() - w2[k].numpy()).max() for k in w1) <= 1e-5
  state = lambda run: safetensors.load(tmp_path / run / "checkpoints" / "step-00000002" / "state.safetensors")
  s1, s2 = state("one"), state("two")
  assert set(s1) == set(s2) and max(np.abs(np.asarray(s1[k]) - np.asarray(s2[k])).max() for k in s1) <= 1e-5
  shutil.copytree(tmp_path / "two", tmp_path / "again")   # as if killed after the first step's checkpoint
  shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-00000002")
  (tmp_path / "again" / "checkpoints" / "latest").write_text("step-00000001")
  _, resumed_losses = _pretrain(tmp_path / "again", corpus, devices="CPU:0,CPU:1", resume=True)
  np.testing.assert_allclose(resumed_losses, two_losses, rtol=0, atol=1e-6)


def test_data_parallel_batch_must_split_evenly(tmp_path, corpus):
  with pytest.raises(ValueError, match="--batch-size 3 cannot be split evenly over 2 devices"):
    _pretrain(tmp_path / "odd", corpus, devices="CPU:0,CPU:1", batch_size=3)
  assert not (tmp_path / "odd" / "checkpoints").exists()


@pytest.mark.slow
def test_dpo_objective_on_split_batches_equals_one_device():
  """DPO's loss and metrics on a batch of 4 pairs, 2 on each device, equal one device's (the gradients' all-reduce
  is the pretraining test's)."""
  from tinygrad import Tensor
  from tinyllama2 import ops
  from tinyllama2.parallel import replicate_model, shard_rows
  from tinyllama2.train.align import DirectPreference, DPOConfig
  args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_position_embeddings=16)
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(0, 64, (4, 9)).astype(np.int32)
  weights = lambda: (rng.random((4, 8)) < 0.7).astype(np.float32)
  batch = (tokens(), weights(), tokens(), weights(), rng.normal(-20, 2, 4).astype(np.float32),
           rng.normal(-20, 2, 4).astype(np.float32))

  def values(devices):
    model = Transformer(args, max_seq_len=16)
    model.init_random(seed=1, std=0.2)
    if devices: replicate_model(model, devices)
    objective = DirectPreference(model, DPOConfig(beta=0.1))
    with ops.training_graph():
      rows = [shard_rows(a, devices) if devices else Tensor(a, device=model.device) for a in batch]
      return objective(*rows).numpy()
  np.testing.assert_allclose(values(SPLIT), values(None), rtol=0, atol=1e-5)


def test_pairs_stay_together_on_split_batches():
  """DPO's and the reward model's batches put each pair's chosen and rejected rows side by side, so a batch split
  over devices keeps every pair on one device; the values come apart again as chosen, rejected."""
  from tinygrad import Tensor
  from tinyllama2.train.align import pair_rows, split_pairs
  c, r = np.arange(24, dtype=np.float32).reshape(4, 6), -np.arange(24, dtype=np.float32).reshape(4, 6) - 1
  for device in ("CPU", SPLIT):
    place = (lambda a: Tensor(a, device="CPU").shard(SPLIT, axis=0)) if device == SPLIT else \
      (lambda a: Tensor(a, device="CPU"))
    rows = pair_rows(place(c), place(r))
    np.testing.assert_array_equal(rows.numpy(), np.stack([c, r], 1).reshape(8, 6))
    chosen, rejected = split_pairs(rows.sum(-1))
    np.testing.assert_array_equal(chosen.numpy(), c.sum(-1))
    np.testing.assert_array_equal(rejected.numpy(), r.sum(-1))
