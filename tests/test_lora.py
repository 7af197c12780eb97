"""LoRA: gradients against the analytic formula, PEFT's file layout, merge, adapters at inference, SFT on stories260K."""
import json

import numpy as np
import pytest
from tinygrad import Context, Tensor

from conftest import SHARED, STORIES, TOK512, need
from tinyllama2 import Llama, ModelArgs, Transformer, lora
from tinyllama2.checkpoint import safetensors
from tinyllama2.checkpoint.hf import permute_to_hf
from tinyllama2.layers import Linear

ALPACA = SHARED / "instruct" / "alpaca_en_demo.json"


def tiny(seed=0) -> Transformer:
  args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_position_embeddings=32)
  m = Transformer(args, max_seq_len=32)
  m.init_random(seed, std=0.2)
  return m


def randomize_adapters(m: Transformer, seed=0) -> None:
  rng = np.random.default_rng(seed)
  for lin in lora.lora_layers(m).values():
    lin.lora_B.assign(Tensor(rng.normal(0, 0.3, lin.lora_B.shape).astype(np.float32), device=m.device)).realize()


def logits(m: Transformer, ids) -> np.ndarray: return Llama(m, None).logits(ids)


IDS = [1, 5, 9, 22, 7, 3, 41, 8]


def test_fresh_adapter_changes_nothing():
  m = tiny()
  before = logits(m, IDS)
  lora.inject(m, lora.LoraConfig(r=4, target_modules=list(lora.MODULES)))
  np.testing.assert_allclose(logits(m, IDS), before, atol=1e-5, rtol=0)   # B = 0: only summation order differs


def test_lora_gradients_match_the_formula():
  rng = np.random.default_rng(0)
  base = Linear(Tensor(rng.normal(size=(6, 5)).astype(np.float32)))
  layer = lora.LoRALinear(base, lora.LoraConfig(r=3, alpha=6, target_modules=["q_proj"]))
  layer.lora_B.assign(Tensor(rng.normal(size=(6, 3)).astype(np.float32))).realize()
  x, g = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
  with Context(TRAINING=1):
    loss = (layer(Tensor(x)) * Tensor(g)).sum()
    dA, dB = (t.numpy() for t in loss.gradient(layer.lora_A, layer.lora_B))
  A, B, s = layer.lora_A.numpy(), layer.lora_B.numpy(), 6 / 3
  # y = x W^T + s x A^T B^T  =>  dL/dB = s g^T (x A^T),  dL/dA = s B^T g^T x
  np.testing.assert_allclose(dB, s * g.T @ (x @ A.T), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dA, s * B.T @ g.T @ x, rtol=1e-5, atol=1e-5)


def test_peft_layout_and_round_trip(tmp_path):
  m = tiny()
  cfg = lora.LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
  lora.inject(m, cfg)
  randomize_adapters(m)
  with_adapter = logits(m, IDS)
  lora.save_adapter(m, tmp_path, cfg, base_model="stories")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  # PEFT's keys: base_model.model.<HF module path>.lora_A.weight [r, in] / lora_B.weight [out, r]
  shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "down_proj": (32, 48)}
  parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
  expected = {}
  for i in range(2):
    for mod, (out_f, in_f) in shapes.items():
      expected[f"base_model.model.model.layers.{i}.{parent[mod]}.{mod}.lora_A.weight"] = (4, in_f)
      expected[f"base_model.model.model.layers.{i}.{parent[mod]}.{mod}.lora_B.weight"] = (out_f, 4)
  saved = safetensors.load(tmp_path / "adapter_model.safetensors")
  assert {k: v.shape for k, v in saved.items()} == expected
  conf = json.loads((tmp_path / "adapter_config.json").read_text())
  for key, value in {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                     "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": "stories", "use_rslora": False,
                     "modules_to_save": None}.items():
    assert conf[key] == value, key
  assert sorted(conf["target_modules"]) == ["down_proj", "k_proj", "q_proj", "v_proj"]
  # in HF's layout the adapted q_proj must be permute_to_hf(W_q + s·B·A): lora_B rows follow the HF permutation
  layer = m.layers[0].attention.wq
  merged_ours = layer.weight.numpy() + 2.0 * layer.lora_B.numpy() @ layer.lora_A.numpy()
  a, b = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
  np.testing.assert_allclose(permute_to_hf(layer.weight.numpy(), 4) + 2.0 * b @ a, permute_to_hf(merged_ours, 4), atol=1e-6)
  # loading it into a fresh copy of the base model reproduces the logits
  m2 = tiny()
  lora.load_adapter(m2, tmp_path)
  np.testing.assert_allclose(logits(m2, IDS), with_adapter, atol=1e-5)


def test_merge_equals_running_with_the_adapter():
  m = tiny()
  lora.inject(m, lora.LoraConfig(r=4, target_modules=list(lora.MODULES)))
  randomize_adapters(m, seed=3)
  unmerged = logits(m, IDS)
  lin = m.layers[1].feed_forward.w2
  lin.merge()
  lin.unmerge()   # unmerge restores the base weight
  np.testing.assert_allclose(logits(m, IDS), unmerged, atol=1e-5)
  lora.merge(m)
  assert not lora.lora_layers(m)
  # W + s·B·A is rounded to float32 once per weight: a few ulps of the logits
  np.testing.assert_allclose(logits(m, IDS), unmerged, rtol=2e-5, atol=1e-5)


def test_adapter_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown LoRA target"): lora.LoraConfig(target_modules=["qkv"])
  with pytest.raises(FileNotFoundError, match="adapter_config.json"): lora.load_adapter(tiny(), tmp_path)
  m = tiny()
  cfg = lora.LoraConfig(r=2, target_modules=["q_proj"])
  lora.inject(m, cfg)
  lora.save_adapter(m, tmp_path, cfg)
  other = Transformer(tiny().args.replace(dim=16, hidden_dim=24), max_seq_len=8)
  with pytest.raises(ValueError, match="lora_A"): lora.load_adapter(other, tmp_path)


@pytest.mark.slow
def test_lora_sft_lowers_held_out_loss_and_keeps_base_frozen(tmp_path):
  need(STORIES, TOK512, ALPACA)
  from tinyllama2.train.recipes import FinetuneOptions, finetune
  before = {k: v.numpy().copy() for k, v in Llama.from_pretrained(STORIES, tokenizer=TOK512).model.state_dict().items()}
  opts = FinetuneOptions(model=str(STORIES), tokenizer=str(TOK512), data=str(ALPACA), out=str(tmp_path / "run"),
                         template="plain", limit=160, seq_len=128, val_fraction=0.2, lora_r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "down_proj"],
                         train=dict(max_steps=24, batch_size=8, lr=5e-3, warmup_steps=3, eval_every=24, save_every=24))
  trainer = finetune(opts, progress=False)
  # held-out loss of the responses with a zero adapter (= the base model) vs. after training
  for lin in lora.lora_layers(trainer.model).values(): lin.merged = True   # bypass the adapter
  trainer._eval.reset()
  base_loss = trainer.evaluate()["val_loss"]
  for lin in lora.lora_layers(trainer.model).values(): lin.merged = False
  trainer._eval.reset()
  tuned_loss = trainer.evaluate()["val_loss"]
  print(f"held-out response loss: base {base_loss:.3f} -> LoRA {tuned_loss:.3f}")
  assert tuned_loss < base_loss - 0.2, (base_loss, tuned_loss)
  after = {k: v.numpy() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
  assert set(after) == set(before)
  for k in before: np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()   # loading it: test_cli


def test_partial_fine_tuning_selects_frozen_weights():
  from tinyllama2.train.recipes import frozen_names
  names = list(tiny().state_dict())
  frozen = frozen_names(names, ["*norm.weight"], 1)
  assert frozen == {n for n in names if n.endswith("norm.weight") or n.startswith(("tok_embeddings.", "layers.0."))}
  assert frozen_names(names, [], 0) == set()
