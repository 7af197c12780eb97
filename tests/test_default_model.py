"""The bundled story model: small enough to ship, loads on a fresh machine, writes stories, holds its loss."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import SHARED, need
from tinyllama2 import DEFAULT_MODEL, Llama
from tinyllama2.train.data import text_blocks

ROOT = Path(__file__).resolve().parents[1]
STORIES_TXT = SHARED / "corpora" / "tinystories_train_first2MiB.txt"
HELD_OUT_LOSS = 2.20   # README: 2.13 nats/token over all 77 held-out blocks (2.08 over the 6 used here)


def test_bundle_is_complete_and_small():
  files = {p.name: p.stat().st_size for p in DEFAULT_MODEL.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
  assert sum(files.values()) <= 12 * 1024 * 1024
  cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
  assert cfg["vocab_size"] == 512 and 1_000_000 <= Llama.from_pretrained(DEFAULT_MODEL).args.n_params() <= 5_000_000


def test_chat_example_runs_on_the_bundle_without_arguments():
  r = subprocess.run([sys.executable, "examples/chat.py", "--prompt", "Once upon a time", "--temperature", "0",
                      "--max-new-tokens", "40"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr
  words = r.stdout.split()
  assert r.stdout.startswith("Once upon a time") and len(words) > 15
  assert sum(w.strip(".,!\"'").isalpha() for w in words) / len(words) > 0.8   # words, not byte soup


def test_held_out_loss_as_reported():
  need(STORIES_TXT)
  llm = Llama.from_pretrained(DEFAULT_MODEL)
  _, held_out = text_blocks([STORIES_TXT], llm.tokenizer, seq_len=256).split(0.02)   # the split pretrain.py held out
  losses = []
  for row in held_out.tokens[:6]:
    logits = llm.logits(row[:-1].tolist()).astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    losses.append(float((logz - logits[np.arange(256), row[1:]]).mean()))
  assert np.mean(losses) < HELD_OUT_LOSS, np.mean(losses)
