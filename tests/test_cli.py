"""examples/chat.py and the CLI end to end, as a user runs them."""
import json
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
