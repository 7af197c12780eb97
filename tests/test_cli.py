"""examples/chat.py and the CLI end to end, as a user runs them."""
import json

import numpy as np
import subprocess
import sys
from pathlib import Path

from conftest import STORIES, TOK512, need

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_chat_example_answers_once():
  need(STORIES, TOK512)
  r = run("examples/chat.py", "--model", str(STORIES), "--tokenizer", str(TOK512), "--prompt", "Lily was",
          "--temperature", "0", "--max-new-tokens", "20")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("Lily was a little girl")


def test_chat_example_bad_model():
  r = run("examples/chat.py", "--model", "/nonexistent/model.bin", "--prompt", "hi")
  assert r.returncode != 0 and "model not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_generate_json():
  need(STORIES, TOK512)
  r = run("-m", "tinyllama2.cli", "generate", "--model", str(STORIES), "--tokenizer", str(TOK512), "--prompt",
          "Lily was", "--max-new-tokens", "8", "--json")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["finish_reason"] == "length" and len(out["tokens"]) == 8 and out["prompt_tokens"] == [1, 317, 286]


def test_chat_example_interactive_session():
  need(STORIES, TOK512)
  r = subprocess.run([sys.executable, "examples/chat.py", "--model", str(STORIES), "--tokenizer", str(TOK512),
                      "--temperature", "0", "--max-new-tokens", "10"], input="Lily was\nThe sun\n",
                     capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("> ") == 3 and " a little girl" in r.stdout   # two answers, then Ctrl-D at the third prompt


def test_finetune_example_then_merge(tmp_path):
  need(STORIES, TOK512)
  alpaca = STORIES.parents[1] / "instruct" / "alpaca_en_demo.json"
  need(alpaca)
  out = tmp_path / "run"
  r = run("examples/finetune_lora.py", "--model", str(STORIES), "--tokenizer", str(TOK512), "--data", str(alpaca),
          "--limit", "24", "--seq-len", "48", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2",
          "--template", "plain", "--out", str(out), "--max-new-tokens", "3")
  assert r.returncode == 0, r.stderr[-2000:]
  assert (out / "adapter" / "adapter_config.json").is_file() and (out / "metrics.jsonl").is_file()
  r = run("examples/finetune_lora.py", "--model", str(STORIES), "--tokenizer", str(TOK512), "--data", str(alpaca),
          "--out", str(out))
  assert r.returncode == 1 and "--resume" in r.stderr   # an existing run is never overwritten
  merged = tmp_path / "merged"
  r = run("-m", "tinyllama2.cli", "merge", "--model", str(STORIES), "--tokenizer", str(TOK512), "--adapter",
          str(out / "adapter"), "--out", str(merged))
  assert r.returncode == 0, r.stderr
  from tinyllama2 import Llama
  ids = [1, 317, 286, 261, 376]
  with_adapter = Llama.from_pretrained(STORIES, tokenizer=TOK512, adapter=out / "adapter").logits(ids)
  np.testing.assert_allclose(Llama.from_pretrained(merged).logits(ids), with_adapter, atol=1e-5)
