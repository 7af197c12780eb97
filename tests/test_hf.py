"""Hugging Face directories: convert stories260K out and back, HF's own rotate-half layout, fp16/bf16, shards."""
import json
import struct

import numpy as np
import pytest

from conftest import STORIES, TOK512, need
from tinyllama2 import Llama
from tinyllama2.checkpoint import hf
from tinyllama2.cli import main as cli


def read_safetensors(path):
  """Independent reader: 8-byte header length, JSON header, raw little-endian data."""
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  out = {}
  for name, info in header.items():
    if name == "__metadata__": continue
    a, b = info["data_offsets"]
    buf = raw[8 + n + a:8 + n + b]
    if info["dtype"] == "BF16": arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else: arr = np.frombuffer(buf, {"F32": np.float32, "F16": np.float16}[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).astype(np.float64)
  return out


def hf_forward(w: dict, cfg: dict, tokens: list[int]) -> np.ndarray:
  """transformers' LlamaModel math on HF-layout weights: rotate_half RoPE, repeat_kv."""
  T, H, KV = len(tokens), cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd, eps = cfg["hidden_size"] // H, cfg["rms_norm_eps"]
  inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
  emb = np.concatenate([np.outer(np.arange(T), inv)] * 2, -1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]
  rot = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # noqa: E731
  norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g  # noqa: E731
  x = w["model.embed_tokens.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = lambda n: w[f"model.layers.{i}.{n}"]  # noqa: E731
    h = norm(x, p("input_layernorm.weight"))
    q = (h @ p("self_attn.q_proj.weight").T).reshape(T, H, hd)
    k = (h @ p("self_attn.k_proj.weight").T).reshape(T, KV, hd)
    v = (h @ p("self_attn.v_proj.weight").T).reshape(T, KV, hd)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    x = x + np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, -1) @ p("self_attn.o_proj.weight").T
    h = norm(x, p("post_attention_layernorm.weight"))
    g = h @ p("mlp.gate_proj.weight").T
    x = x + (g / (1 + np.exp(-g)) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
  x = norm(x, w["model.norm.weight"])
  return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  need(STORIES, TOK512)
  root = tmp_path_factory.mktemp("hf")
  for dtype in ("f32", "f16", "bf16"):
    assert cli(["convert", str(STORIES), "--to", "hf", str(root / dtype), "--tokenizer", str(TOK512), "--dtype", dtype]) == 0
  return root


def test_convert_writes_a_standard_hf_directory(hf_dirs):
  d = hf_dirs / "f32"
  cfg = json.loads((d / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 4
  assert cfg["tie_word_embeddings"] is True and (d / "tokenizer.model").is_file()
  names = set(read_safetensors(d / "model.safetensors"))
  assert "model.layers.4.self_attn.k_proj.weight" in names and "lm_head.weight" not in names


def test_hf_layout_runs_in_hf_math(hf_dirs, stories, reference):
  """The exported weights, run with transformers' rotate-half formulas, give run.c's logits."""
  d = hf_dirs / "f32"
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:40]
  logits = hf_forward(read_safetensors(d / "model.safetensors"), json.loads((d / "config.json").read_text()), tokens)
  np.testing.assert_allclose(logits, stories.logits(tokens), atol=1e-4)


def test_roundtrip_logits_identical(hf_dirs, stories, reference):
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  from tinyllama2.checkpoint import load_checkpoint
  original, converted = load_checkpoint(STORIES), load_checkpoint(hf_dirs / "f32")
  assert original.args.replace(eos_id=2) == converted.args.replace(eos_id=2)
  for name, w in original.weights.items(): np.testing.assert_array_equal(converted.weights[name], w, err_msg=name)
  back = Llama.from_pretrained(hf_dirs / "f32")
  assert back.tokenizer.encode("Once upon a time") == stories.tokenizer.encode("Once upon a time")
  # same weights; kernels may sum in another order when shapes differ, hence not bitwise
  np.testing.assert_allclose(back.logits(tokens), stories.logits(tokens), atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [("f16", 0.02), ("bf16", 0.15)])
def test_half_precision_copies(hf_dirs, stories, reference, dtype, tol):
  """Weights rounded to fp16 (11-bit mantissa) or bf16 (8-bit) move logits of magnitude ~10 by about
  |logit| * 2^-11 (resp. 2^-8) times a few accumulated roundings; tolerances are that bound, and argmax is kept."""
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  ref = stories.logits(tokens)
  half = Llama.from_pretrained(hf_dirs / dtype, dtype="float32")
  got = half.logits(tokens)
  assert np.abs(got - ref).max() < tol
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
  if dtype == "f16":
    native = Llama.from_pretrained(hf_dirs / dtype)            # kept as fp16 on the device
    assert native.model.dtype.name == "half"
    assert np.abs(native.logits(tokens) - ref).max() < 0.1


def test_sharded_directory_loads(tmp_path, stories, reference):
  from tinyllama2.checkpoint import llama2c
  args, weights = llama2c.load(STORIES)
  hf.save(tmp_path, args, weights, tokenizer_model=TOK512, max_shard_bytes=200_000)
  index = json.loads((tmp_path / hf.INDEX).read_text())
  assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  np.testing.assert_allclose(Llama.from_pretrained(tmp_path).logits(tokens), stories.logits(tokens), atol=1e-4)


def test_convert_refuses_to_overwrite(hf_dirs, capsys):
  before = (hf_dirs / "f32" / "config.json").read_bytes()
  assert cli(["convert", str(STORIES), "--to", "hf", str(hf_dirs / "f32")]) == 1
  assert "already exists" in capsys.readouterr().err
  assert (hf_dirs / "f32" / "config.json").read_bytes() == before
