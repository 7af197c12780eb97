"""The seams of the architecture: kernel choice by what layers hold, recapture after a weights change, the generation
settings as one dataclass, token-step records."""
import dataclasses

import numpy as np
import pytest
from tinygrad import Context, Tensor, dtypes

from tinyllama2 import GenerationConfig, Llama, ModelArgs, Transformer, lora, ops
from tinyllama2.devices import resolve_device
from tinyllama2.generate import Stopping
from tinyllama2.layers import Linear
from tinyllama2.quantize import QuantLinear, quantize_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160, max_position_embeddings=48)


def _model(seed: int = 0) -> Transformer:
  m = Transformer(ARGS, max_seq_len=48)
  m.init_random(seed=seed, std=0.2)
  return m


def test_kernels_are_chosen_by_what_a_layer_holds():
  """A LoRA layer (whose kernel weights are None), a mix of float and quantized layers, or training: tinygrad's graph;
  plain and quantized layers: the device's kernels, if it has any."""
  m = _model()
  x = Tensor.ones(1, 1, 64, device=m.device)
  wq, wk, wv = (getattr(m.layers[0].attention, n) for n in ("wq", "wk", "wv"))
  kernels, route = ops.backend(m.device), ops.route(x, [wq, wk, wv])
  assert route is None if kernels is None else route[:2] == ("row", kernels)
  quantized = QuantLinear.from_float(wk.weight, "int8")
  assert ops.route(x, [wq, quantized, wv]) is None and (ops.route(x, [quantized]) is None) == (kernels is None)
  lora.inject(m, lora.LoraConfig(r=2, target_modules=["q_proj"]))
  assert m.layers[0].attention.wq.kernel_weights is None and ops.route(x, [m.layers[0].attention.wq]) is None
  with Context(TRAINING=1): assert ops.route(x, [wk]) is None


def test_qkv_of_mixed_layers_equals_the_three_products():
  m = _model(1)
  a = m.layers[0].attention
  a.wk = QuantLinear.from_float(a.wk.weight, "int4")   # no kernel reads the three together now
  x = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
  q, k, v = (t.numpy() for t in ops.qkv(Tensor(x, device=m.device), a.wq, a.wk, a.wv))
  np.testing.assert_allclose(q[0, 0], a.wq.weight.numpy() @ x[0, 0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(v[0, 0], a.wv.weight.numpy() @ x[0, 0], rtol=1e-4, atol=1e-4)
  assert k.shape == (1, 1, ARGS.n_kv_heads * ARGS.head_dim)


def test_a_decoder_recaptures_its_graphs_after_the_weights_change():
  """Quantizing a model that already decoded: its next tokens are those of a model quantized before any step (a
  stale graph would keep reading the float weights)."""
  prompt = [1, 5, 17, 42]
  used, fresh = Llama(_model(2), None), Llama(_model(2), None)
  used.generate(prompt, max_new_tokens=6)   # graphs captured (and replayed) for the float weights
  quantize_model(used.model, "int4")
  quantize_model(fresh.model, "int4")
  a, b = used.generate(prompt, max_new_tokens=8), fresh.generate(prompt, max_new_tokens=8)
  assert a.tokens == b.tokens
  held = prompt + a.tokens[:-1]   # 4 + 7 tokens, in whichever slot ran each generation
  slot = lambda llm: next(s for s, h in enumerate(llm.decoder.held) if h == held)
  after, want = used.decoder.step(a.tokens[-1], 11, slot(used)), fresh.decoder.step(b.tokens[-1], 11, slot(fresh))
  np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5)


def test_loading_weights_into_a_model_that_decoded_recaptures_too():
  prompt = [1, 5, 17, 42]
  used, other = Llama(_model(5), None), Llama(_model(6), None)
  used.generate(prompt, max_new_tokens=6)
  used.model.load_weights({k: v.numpy() for k, v in other.model.state_dict().items()})
  assert used.generate(prompt, max_new_tokens=8).tokens == other.generate(prompt, max_new_tokens=8).tokens


def test_generation_settings_are_one_dataclass():
  cfg = GenerationConfig.of(max_new_tokens=7, stop="x")
  assert cfg.max_new_tokens == 7 and cfg.stop == ["x"] and cfg.top_k == 50   # Hugging Face's defaults
  assert GenerationConfig.of(cfg, top_k=3).top_k == 3 and cfg.top_k == 50    # a copy: the config is unchanged
  with pytest.raises(ValueError, match="unknown generation setting.*top_kk"): GenerationConfig.of(top_kk=3)
  with pytest.raises(ValueError, match="num_beams must be >= 1"): GenerationConfig.of(num_beams=0)
  llm = Llama(_model(3), None)
  with pytest.raises(ValueError, match="unknown generation setting"): llm.generate([1, 2], temprature=0.5)
  # every field but do_sample (implied by --temperature) has a flag with its help line
  import argparse
  from tinyllama2.cli.common import add_sampling_args
  p = argparse.ArgumentParser()
  add_sampling_args(p)
  flags = {a.dest: a.help for a in p._actions if a.dest != "help"}
  fields = {f.name: f.metadata["help"] for f in dataclasses.fields(GenerationConfig) if f.name != "do_sample"}
  assert flags == fields


def test_token_steps_carry_tokens_logprobs_and_the_finish_reason():
  """Each record: the token, its log-probability under the model (log-softmax of the logits, numpy), and the finish
  reason on the last one; the records of one prompt are the tokens generate() returns."""
  llm = Llama(_model(4), None)
  prompt = [1, 9, 33]
  cfg = GenerationConfig.of(max_new_tokens=5)
  steps = list(llm.engine.submit(prompt, cfg, Stopping(set(), 5, llm.model.max_seq_len)))
  assert [s.finish_reason for s in steps] == [None] * 4 + ["length"]
  assert [s.token for s in steps] == llm.generate(prompt, cfg).tokens
  full = llm.logits(prompt + [s.token for s in steps])
  for i, s in enumerate(steps):
    row = full[len(prompt) - 1 + i].astype(np.float64)
    want = row[s.token] - row.max() - np.log(np.exp(row - row.max()).sum())
    assert s.logprob == pytest.approx(want, abs=1e-3)
  assert steps[-1].decode_tokens_per_s > 0 and steps[-1].time_to_first_token_s > 0


def test_a_layer_factory_builds_every_projection():
  """Transformer(linear=...) builds every projection and the untied head with the factory (not the embedding)."""
  built = []
  def linear(n_in: int, n_out: int) -> Linear:
    built.append((n_in, n_out))
    return Linear.empty(n_in, n_out, dtypes.float32, resolve_device(None))
  m = Transformer(ARGS.replace(tie_embeddings=False), linear=linear)
  per_layer = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 160), (160, 64), (64, 160)]   # wq wk wv wo w1 w2 w3
  assert built == per_layer * ARGS.n_layers + [(64, 96)]
  assert m.layers[1].feed_forward.w2.weight.shape == (64, 160) and m.head is m.output
