"""Meta checkpoints: safe .pth loading (a malicious pickle is refused), shards, round trip."""
import pickle
import zipfile

import numpy as np
import pytest

from conftest import STORIES, TOK512, need
from tinyllama2 import Llama
from tinyllama2.checkpoint import llama2c, meta

CALLS = []


def record_call(*args):
  """What a malicious pickle would run; the test checks it never is."""
  CALLS.append(args)
  return {}


def write_pth(path, pickle_bytes: bytes, storages: dict[str, bytes] = {}):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    for key, raw in storages.items(): z.writestr(f"archive/data/{key}", raw)


@pytest.mark.parametrize("module,name", [("test_meta", "record_call"), ("os", "system"), ("builtins", "eval"),
                                         ("numpy", "load"), ("numpy.core.multiarray", "_reconstruct")])
def test_malicious_pickle_is_refused(tmp_path, module, name):
  payload = pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode()
  payload += pickle.BINUNICODE + (5).to_bytes(4, "little") + b"touch" + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
  bad = tmp_path / "consolidated.00.pth"
  write_pth(bad, payload)
  with pytest.raises(ValueError, match=f"refusing to load {module}.{name}"):
    meta.load_pth(bad)
  assert CALLS == []


def test_not_a_zip_and_bad_storage(tmp_path):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
    meta.load_pth(legacy)
  good = tmp_path / "good"
  args, weights = llama2c.load(STORIES) if STORIES.exists() else pytest.skip("no stories260K")
  meta.save(good, args, {k: np.asarray(v) for k, v in list(weights.items())[:3]})
  with zipfile.ZipFile(good / "consolidated.00.pth") as z: files = {n: z.read(n) for n in z.namelist()}
  cut = tmp_path / "cut.pth"
  with zipfile.ZipFile(cut, "w") as z:
    for n, raw in files.items(): z.writestr(n, raw[: len(raw) // 2] if n.endswith("/data/1") else raw)
  with pytest.raises(ValueError, match="truncated"):
    meta.load_pth(cut)


@pytest.fixture(scope="module")
def stories_meta(tmp_path_factory):
  from tinyllama2.cli import main as cli
  need(STORIES, TOK512)
  out = tmp_path_factory.mktemp("meta") / "stories"
  assert cli(["convert", str(STORIES), "--to", "meta", str(out), "--tokenizer", str(TOK512)]) == 0
  return out


def test_meta_roundtrip(stories_meta, stories, reference):
  from tinyllama2.checkpoint import load_checkpoint
  original, back = load_checkpoint(STORIES), load_checkpoint(stories_meta)
  assert back.format == "meta" and back.args.replace(max_position_embeddings=512) == original.args
  for name, w in original.weights.items(): np.testing.assert_array_equal(back.weights[name], w, err_msg=name)
  llm = Llama.from_pretrained(stories_meta)
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:64]
  np.testing.assert_allclose(llm.logits(tokens), stories.logits(tokens), atol=1e-4)


def test_two_shards_merge_to_the_unsplit_model(tmp_path, stories_meta):
  """Split the way Meta's model parallelism does: column-parallel rows, row-parallel columns, norms copied."""
  args, weights = meta.load(stories_meta)
  halves = [{}, {}]
  for name, w in weights.items():
    key = name.split(".", 2)[-1] if name.startswith("layers.") else name
    axis = {"tok_embeddings.weight": 1, "attention.wo.weight": 1, "feed_forward.w2.weight": 1}.get(key, 0)
    if w.ndim == 1: parts = [w, w]
    elif key == "feed_forward.w2.weight": parts = [w[:, :86], w[:, 86:]]
    else: parts = np.split(w, 2, axis=axis)
    for half, part in zip(halves, parts): half[name] = np.ascontiguousarray(part)
  sharded = tmp_path / "sharded"
  for i, half in enumerate(halves):
    meta.save(tmp_path / f"s{i}", args, half)
    sharded.mkdir(exist_ok=True)
    (tmp_path / f"s{i}" / "consolidated.00.pth").rename(sharded / f"consolidated.{i:02d}.pth")
  (tmp_path / "s0" / "params.json").rename(sharded / "params.json")
  merged_args, merged = meta.load(sharded)
  assert merged_args == args
  for name, w in weights.items(): np.testing.assert_array_equal(merged[name], w, err_msg=name)


def test_real_torch_files_when_torch_is_installed(tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional cross-check)")
  sd = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 3).bfloat16(), "d": torch.randn(4, 6)[:, ::2]}
  torch.save(sd, tmp_path / "t.pth")
  got = meta.load_pth(tmp_path / "t.pth")
  for k, v in sd.items(): np.testing.assert_array_equal(got[k], v.float().numpy() if k == "c" else v.numpy())


def test_conversion_chain_is_lossless(tmp_path, stories, reference):
  """stories260K → HF → GGUF (f32) → HF → Meta → llama2.c v1: weights identical at every hop."""
  from tinyllama2.checkpoint import load_checkpoint
  from tinyllama2.cli import main as cli
  need(STORIES, TOK512)
  original = load_checkpoint(STORIES)
  hops = [("hf", tmp_path / "hf1"), ("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf2"), ("meta", tmp_path / "meta")]
  src = STORIES
  for fmt, out in hops:
    assert cli(["convert", str(src), "--to", fmt, str(out), "--tokenizer", str(TOK512)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.args.replace(max_position_embeddings=512, eos_id=2) == original.args, fmt
    for name, w in original.weights.items(): np.testing.assert_array_equal(ckpt.float_weights()[name], w, err_msg=f"{fmt} {name}")
    src = out
  llama2c.save_v1(tmp_path / "back.bin", original.args, load_checkpoint(src).float_weights())
  back = Llama.from_pretrained(tmp_path / "back.bin")
  tokens = reference["runc_generated"]["runs"][0]["tokens"][:32]
  np.testing.assert_allclose(back.logits(tokens), stories.logits(tokens), atol=1e-5)
