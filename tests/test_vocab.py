"""Vocabulary: train with Llama's settings, merge Chinese pieces into Llama's tokenizer, resize a model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import LLAMA_TOK, SHARED, STORIES, TOK512, need
from tinyllama2 import Llama
from tinyllama2.vocab import merge_vocab, resize_embeddings, train_vocab

ZH = SHARED / "corpora" / "hongloumeng_zh.txt"
EN = SHARED / "corpora" / "tinyshakespeare_input.txt"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zh_vocab(tmp_path_factory):
  """A Chinese BPE vocabulary (6000 pieces) trained on the first 90% of 红楼梦; (model path, held-out text)."""
  need(ZH)
  d = tmp_path_factory.mktemp("zh")
  text = ZH.read_text(encoding="utf-8")
  cut = int(len(text) * 0.9)
  (d / "train.txt").write_text(text[:cut], encoding="utf-8")
  return train_vocab([d / "train.txt"], 6000, d / "zh", verbose=False), text[cut:]


def sp(path) -> spm.SentencePieceProcessor:
  p = spm.SentencePieceProcessor()
  p.Load(str(path))
  return p


def test_trained_vocab_has_llama_settings(zh_vocab):
  s = sp(zh_vocab[0])
  assert s.vocab_size() == 6000
  assert (s.unk_id(), s.bos_id(), s.eos_id(), s.pad_id()) == (0, 1, 2, -1)
  assert s.IdToPiece(3) == "<0x00>" and s.is_byte(3)            # byte fallback
  assert [p for p in s.EncodeAsPieces("2024") if p != "▁"] == ["<0x32>", "<0x30>", "<0x32>", "<0x34>"]   # one per digit
  emoji = "宝玉笑道 🙂"
  assert s.DecodeIds(s.EncodeAsIds(emoji)) == emoji               # unknown characters fall back to bytes


def test_merge_keeps_llama_and_shrinks_chinese(zh_vocab, tmp_path):
  need(LLAMA_TOK, EN)
  zh, held_out = zh_vocab
  n_base, n_merged = merge_vocab(LLAMA_TOK, zh, tmp_path / "merged.model")
  base, merged = sp(LLAMA_TOK), sp(tmp_path / "merged.model")
  assert n_base == 32000 and merged.vocab_size() == n_merged > 32000
  for i in range(32000):
    assert merged.IdToPiece(i) == base.IdToPiece(i) and merged.GetScore(i) == base.GetScore(i)
  # the appended pieces are exactly ZH's normal pieces that Llama lacks, in ZH's order
  z = sp(zh)
  have = {base.IdToPiece(i) for i in range(32000)}
  expected = [z.IdToPiece(i) for i in range(z.vocab_size())
              if not (z.IsControl(i) or z.IsUnknown(i) or z.IsByte(i)) and z.IdToPiece(i) not in have]
  assert [merged.IdToPiece(i) for i in range(32000, n_merged)] == expected
  english = EN.read_text(encoding="utf-8")
  assert merged.EncodeAsIds(english) == base.EncodeAsIds(english)
  ratio = len(merged.EncodeAsIds(held_out)) / len(base.EncodeAsIds(held_out))
  assert ratio < 0.65, ratio   # Chinese-LLaMA reports about half the tokens
  for s in ["宝玉笑道：“你好！” Hello, world 🙂🎉 naïve 2024年", "  leading spaces\tand tabs\n林黛玉"]:
    assert merged.DecodeIds(merged.EncodeAsIds(s)) == s


def test_merge_errors(tmp_path):
  need(LLAMA_TOK)
  with pytest.raises(FileNotFoundError): merge_vocab(LLAMA_TOK, tmp_path / "nope.model", tmp_path / "o.model")
  (tmp_path / "bad.model").write_bytes(b"\xff\xff\xff")
  with pytest.raises(ValueError, match="SentencePiece"): merge_vocab(tmp_path / "bad.model", LLAMA_TOK, tmp_path / "o.model")
  with pytest.raises(ValueError, match="overwrite"): merge_vocab(LLAMA_TOK, LLAMA_TOK, LLAMA_TOK)


def test_train_errors(tmp_path):
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty"): train_vocab([tmp_path / "empty.txt"], 300, tmp_path / "v")
  with pytest.raises(FileNotFoundError): train_vocab([tmp_path / "missing.txt"], 300, tmp_path / "v")
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
  with pytest.raises(ValueError, match="UTF-8"): train_vocab([tmp_path / "bin.txt"], 300, tmp_path / "v")


def test_resize_rows_are_the_mean():
  w = {"tok_embeddings.weight": np.arange(12, dtype=np.float32).reshape(4, 3), "output.weight": np.ones((4, 3), np.float32)}
  out = resize_embeddings(w, 6, tie_embeddings=False)
  np.testing.assert_array_equal(out["tok_embeddings.weight"][:4], w["tok_embeddings.weight"])
  np.testing.assert_array_equal(out["tok_embeddings.weight"][4:], [[4.5, 5.5, 6.5]] * 2)
  assert out["output.weight"].shape == (6, 3)


@pytest.mark.slow
def test_resized_stories260k_keeps_logits_and_fine_tunes_on_chinese(zh_vocab, tmp_path):
  need(STORIES, TOK512, ZH)
  merged = tmp_path / "tok512_zh.model"
  merge_vocab(TOK512, zh_vocab[0], merged)
  r = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "vocab", "resize", str(STORIES), "--tokenizer", str(merged),
                      "--out", str(tmp_path / "resized")], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "resized" / "config.json").read_text())["vocab_size"] == sp(merged).vocab_size()
  old = Llama.from_pretrained(STORIES, tokenizer=TOK512)
  new = Llama.from_pretrained(tmp_path / "resized")
  ids = old.tokenizer.encode("Once upon a time, there was a little girl named Lily.")
  assert new.tokenizer.encode("Once upon a time, there was a little girl named Lily.") == ids
  np.testing.assert_allclose(new.logits(ids)[:, :512], old.logits(ids), atol=1e-5)
  # continued pretraining on Chinese text with the trainer lowers the loss; a partial fine-tune (the first
  # block frozen by a glob) leaves the frozen weights bit-identical and moves all the others
  from tinyllama2.train.recipes import FinetuneOptions, finetune
  (tmp_path / "zh.txt").write_text(zh_vocab[1][:20000], encoding="utf-8")
  before = {k: v.numpy().copy() for k, v in new.model.state_dict().items()}
  t = finetune(FinetuneOptions(model=str(tmp_path / "resized"), data=str(tmp_path / "zh.txt"), out=str(tmp_path / "run"),
                               lora=False, freeze=["layers.0.*"], seq_len=64, val_fraction=0.1,
                               train=dict(max_steps=12, batch_size=8, lr=5e-3, warmup_steps=2, eval_every=12, save_every=12)),
               progress=False)
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5 and np.isfinite(rows[-1]["val_loss"])
  assert (tmp_path / "run" / "model" / "config.json").is_file() and t.step == 12
  for k, v in t.model.state_dict().items():
    assert np.array_equal(v.numpy(), before[k]) == k.startswith("layers.0."), k
