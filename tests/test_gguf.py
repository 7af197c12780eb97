"""GGUF: metadata, tensors (incl. Q8_0/Q4_0 blocks), the vocabulary as a tokenizer, bad files."""
import struct

import numpy as np
import pytest

import reference_numpy
from conftest import LLAMA_TOK, SHARED, need
from test_quantize import np_q4_0, np_q8_0
from tinyllama2 import Llama
from tinyllama2.checkpoint import gguf

TINY = SHARED / "gguf" / "llama-2-tiny-random.gguf"
VOCAB = SHARED / "gguf" / "ggml-vocab-llama-spm.gguf"
VECTORS = SHARED / "reference" / "llamacpp_vocab_tests"


def gguf_string(s: str) -> bytes: return struct.pack("<Q", len(s.encode())) + s.encode()


def gguf_kv(key: str, value) -> bytes:
  if isinstance(value, str): return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)
  if isinstance(value, float): return gguf_string(key) + struct.pack("<If", 6, value)
  return gguf_string(key) + struct.pack("<II", 4, value)


def write_gguf(path, tensors: dict[str, tuple[int, tuple[int, ...], bytes]], alignment: int = 32,
               metadata: dict | None = None) -> None:
  """A minimal GGUF v3 writer following the spec: header, metadata, tensor infos, aligned data."""
  metadata = {"general.architecture": "llama", **(metadata or {})}
  kv = b"".join(gguf_kv(k, v) for k, v in metadata.items())
  infos, data = b"", b""
  for name, (ttype, shape, raw) in tensors.items():
    data += b"\0" * (-len(data) % alignment)
    infos += gguf_string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
    infos += struct.pack("<IQ", ttype, len(data))
    data += raw
  head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + kv + infos
  path.write_bytes(head + b"\0" * (-len(head) % alignment) + data)


def q8_0_bytes(w):
  b = w.reshape(w.shape[0], -1, 32)
  d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float32)
  q = np.rint(b * np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)[..., None]).astype(np.int8)
  rec = np.zeros(d.shape, np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
  rec["d"], rec["qs"] = d.astype(np.float16), q
  return rec.tobytes()


def q4_0_bytes(w):
  b = w.reshape(w.shape[0], -1, 32)
  mx = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
  d = (mx / np.float32(-8)).astype(np.float32)
  q = np.minimum(15, np.trunc(b * np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)[..., None] + 8.5)).astype(np.uint8)
  rec = np.zeros(d.shape, np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
  rec["d"], rec["qs"] = d.astype(np.float16), q[..., :16] | (q[..., 16:] << 4)
  return rec.tobytes()


def test_quantized_tensors_dequantize_like_the_block_layout(tmp_path):
  rng = np.random.default_rng(0)
  w8, w4 = (rng.standard_normal((2, 64, 96)) * 0.1).astype(np.float32)
  f32 = rng.standard_normal((3, 5)).astype(np.float32)
  path = tmp_path / "q.gguf"
  write_gguf(path, {"a": (gguf.Q8_0, w8.shape, q8_0_bytes(w8)), "b": (gguf.Q4_0, w4.shape, q4_0_bytes(w4)),
                    "c": (gguf.F32, f32.shape, f32.tobytes()), "d": (gguf.F16, f32.shape, f32.astype(np.float16).tobytes())})
  f = gguf.read(path)
  assert f.metadata == {"general.architecture": "llama"} and f.tensors["a"].shape == (64, 96)
  np.testing.assert_allclose(gguf.dequantize(f, f.tensors["a"]), np_q8_0(w8), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(gguf.dequantize(f, f.tensors["b"]), np_q4_0(w4), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(gguf.dequantize(f, f.tensors["c"]), f32)
  np.testing.assert_array_equal(gguf.dequantize(f, f.tensors["d"]), f32.astype(np.float16))


def test_tiny_random_gguf_from_another_producer_runs():
  need(TINY)
  llm = Llama.from_pretrained(TINY, dtype="float32")
  a = llm.args
  assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.hidden_dim, a.vocab_size) == (8, 1, 2, 2, 32, 32000)
  ids = llm.tokenizer.encode("Hello world")
  assert ids == [1, 15043, 3186]
  weights = {k: v.numpy() for k, v in llm.model.state_dict().items()}
  np.testing.assert_allclose(llm.logits(ids), reference_numpy.forward(weights, a, ids), atol=1e-4, rtol=1e-4)
  assert len(llm.generate("Hello", max_new_tokens=4, eos_token_id=[]).tokens) == 4


def test_vocab_gguf_tokenizer_matches_llamacpp_vectors_and_sentencepiece():
  need(VOCAB, VECTORS, LLAMA_TOK)
  import sentencepiece as spm
  from tinyllama2 import Tokenizer
  tok = Tokenizer.from_proto(gguf.sentencepiece_proto(gguf.read(VOCAB)), VOCAB)
  ref = spm.SentencePieceProcessor(model_file=str(LLAMA_TOK))
  inputs = (VECTORS / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
  expected = (VECTORS / "ggml-vocab-llama-spm.gguf.out").read_text().strip("\n").split("\n")
  inputs = inputs[:len(expected)]
  assert len(inputs) == len(expected) > 40
  for text, want in zip(inputs, expected):
    ids = tok.encode(text, bos=False)
    assert ids == [int(x) for x in want.split()], repr(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == ref.decode(ids)


def test_vocab_only_gguf_is_not_a_model():
  need(VOCAB)
  with pytest.raises(ValueError, match="no tensors"):
    Llama.from_pretrained(VOCAB)


@pytest.mark.parametrize("cut", [3, 20, 5000, 1_000_000, -10])
def test_truncated_gguf_is_a_clean_error(tmp_path, cut):
  need(TINY)
  raw = TINY.read_bytes()
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(raw[:cut])
  with pytest.raises(ValueError, match="GGUF"):
    Llama.from_pretrained(bad)


def test_quantized_gguf_loads_blocks_without_requantizing(tmp_path, reference):
  """stories260K written as GGUF with Q8_0 matrices (F32 where a row is not a multiple of 32)."""
  from conftest import STORIES
  from tinyllama2.checkpoint import llama2c
  from tinyllama2.quantize import QuantLinear
  need(STORIES)
  args, weights = llama2c.load(STORIES)
  names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
  for i in range(args.n_layers):
    for ours, theirs in (("attention.wq", "attn_q"), ("attention.wk", "attn_k"), ("attention.wv", "attn_v"),
                         ("attention.wo", "attn_output"), ("feed_forward.w1", "ffn_gate"), ("feed_forward.w2", "ffn_down"),
                         ("feed_forward.w3", "ffn_up"), ("attention_norm", "attn_norm"), ("ffn_norm", "ffn_norm")):
      names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
  tensors = {}
  for ours, theirs in names.items():
    w = np.ascontiguousarray(weights[ours], dtype=np.float32)
    quantize = w.ndim == 2 and w.shape[1] % 32 == 0 and ours != "tok_embeddings.weight"
    tensors[theirs] = (gguf.Q8_0, w.shape, q8_0_bytes(w)) if quantize else (gguf.F32, w.shape, w.tobytes())
  meta = {"llama.embedding_length": args.dim, "llama.block_count": args.n_layers, "llama.attention.head_count": args.n_heads,
          "llama.attention.head_count_kv": args.n_kv_heads, "llama.feed_forward_length": args.hidden_dim,
          "llama.context_length": args.max_position_embeddings, "llama.attention.layer_norm_rms_epsilon": 1e-5,
          "llama.vocab_size": args.vocab_size}
  path = tmp_path / "stories260K-q8_0.gguf"
  write_gguf(path, tensors, metadata=meta)
  llm = Llama.from_pretrained(path)
  wq = llm.model.layers[0].attention.wq
  assert isinstance(wq, QuantLinear) and wq.mode == "int8"
  raw = gguf.q8_0_blocks(np.frombuffer(tensors["blk.0.attn_q.weight"][2], np.uint8), (64, 64))
  np.testing.assert_array_equal(wq.packed.numpy(), raw[0])        # the file's bytes, not a re-quantization
  assert not isinstance(llm.model.layers[0].feed_forward.w2, QuantLinear)
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  from tinyllama2 import Transformer
  dense = Transformer(args, dtype=llm.model.dtype)
  dense.load_weights({k: gguf.QuantizedWeight.dequantize(v) if isinstance(v, gguf.QuantizedWeight) else v
                      for k, v in gguf.load(path)[1].items()})
  np.testing.assert_allclose(llm.logits(tokens), Llama(dense, None).logits(tokens), atol=1e-4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  from conftest import STORIES, TOK512
  from tinyllama2.cli import main as cli
  need(STORIES, TOK512)
  out = tmp_path_factory.mktemp("gguf")
  for dtype in ("f32", "f16", "q8_0"):
    assert cli(["convert", str(STORIES), "--to", "gguf", str(out / f"{dtype}.gguf"), "--tokenizer", str(TOK512),
                "--dtype", dtype]) == 0
  return out


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("f16", 0.05), ("q8_0", 0.5)])
def test_gguf_export_roundtrip(exported, stories, reference, dtype, tol):
  """f32 is exact; f16 rounds each weight by <= 2^-11 relative and q8_0 by <= 1/254 of its block's max,
  which moves stories260K's logits (magnitude ~10) by about 0.01 and 0.3 at most."""
  llm = Llama.from_pretrained(exported / f"{dtype}.gguf", dtype="float32")
  assert llm.tokenizer.encode("Once upon a time") == stories.tokenizer.encode("Once upon a time")
  assert llm.model.quantization == ("mixed" if dtype == "q8_0" else None)
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  assert np.abs(llm.logits(tokens) - stories.logits(tokens)).max() <= tol


def test_gguf_export_reads_with_llamacpp_gguf_package(exported):
  gguf_py = pytest.importorskip("gguf", reason="the PyPI gguf package (llama.cpp's reader) is not installed")
  reader = gguf_py.GGUFReader(str(exported / "q8_0.gguf"))
  assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
  tokens = reader.fields["tokenizer.ggml.tokens"]
  assert len(tokens.data) == 512 and bytes(tokens.parts[tokens.data[1]]).decode() == "<s>"
  ours = gguf.read(exported / "q8_0.gguf")
  for t in reader.tensors:
    theirs = gguf_py.dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name].shape)
    np.testing.assert_array_equal(theirs, gguf.dequantize(ours, ours.tensors[t.name]))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_dequantize_blocks_made_by_gguf_package(qtype):
  gguf_py = pytest.importorskip("gguf", reason="the PyPI gguf package (llama.cpp's quantizer) is not installed")
  t = gguf_py.GGMLQuantizationType[qtype]
  data = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
  raw = np.ascontiguousarray(gguf_py.quants.quantize(data, t)).view(np.uint8).reshape(-1)
  blocks = (gguf.q8_0_blocks if qtype == "Q8_0" else gguf.q4_0_blocks)(raw, (8, 64))
  w = gguf.QuantizedWeight("int8" if qtype == "Q8_0" else "int4", *blocks, (8, 64))
  np.testing.assert_array_equal(w.dequantize(), gguf_py.quants.dequantize(raw, t).reshape(8, 64))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K", "Q6_K"])
def test_k_quant_and_q4_1_dequantization(tmp_path, qtype):
  """Random blocks (finite fp16 scales) dequantized by us and by llama.cpp's gguf package."""
  gguf_py = pytest.importorskip("gguf", reason="the PyPI gguf package (llama.cpp's dequantizer) is not installed")
  ttype = {"Q4_1": gguf.Q4_1, "Q4_K": gguf.Q4_K, "Q6_K": gguf.Q6_K}[qtype]
  per_block, block_bytes = gguf.BLOCKS[ttype]
  rows, cols = 4, 512
  raw = np.random.default_rng(5).integers(0, 256, rows * cols // per_block * block_bytes, dtype=np.uint8)
  blocks = raw.reshape(-1, block_bytes)
  half_offsets = {"Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[qtype]   # where the fp16 scales sit
  for off in half_offsets:
    blocks[:, off:off + 2] = np.frombuffer(np.random.default_rng(6).uniform(-0.1, 0.1, len(blocks)).astype("<f2").tobytes(),
                                           np.uint8).reshape(-1, 2)
  path = tmp_path / "k.gguf"
  write_gguf(path, {"w": (ttype, (rows, cols), blocks.tobytes())})
  f = gguf.read(path)
  ours = gguf.dequantize(f, f.tensors["w"])
  theirs = gguf_py.quants.dequantize(blocks.reshape(rows, -1), gguf_py.GGMLQuantizationType[qtype]).reshape(rows, cols)
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
