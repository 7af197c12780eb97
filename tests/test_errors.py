"""User mistakes give clear errors, never tracebacks from deep inside."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STORIES, need
from tinyllama2 import Llama

ROOT = Path(__file__).resolve().parents[1]


def test_missing_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="model not found"):
    Llama.from_pretrained(tmp_path / "nope.bin")


def test_truncated_llama2c_file(tmp_path):
  need(STORIES)
  cut = tmp_path / "cut.bin"
  cut.write_bytes(STORIES.read_bytes()[:500_000])
  with pytest.raises(ValueError, match="truncated llama2.c checkpoint"):
    Llama.from_pretrained(cut)
  tiny = tmp_path / "tiny.bin"
  tiny.write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match="too short"):
    Llama.from_pretrained(tiny)


def test_unknown_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
  with pytest.raises(ValueError, match="unsupported architecture"):
    Llama.from_pretrained(tmp_path)


def test_missing_weights_in_hf_dir(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                    "num_hidden_layers": 1, "num_attention_heads": 4,
                                                    "vocab_size": 10, "intermediate_size": 32}))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    Llama.from_pretrained(tmp_path)


def test_prompt_longer_than_context(stories):
  with pytest.raises(ValueError, match="longer than max_seq_len 512"):
    stories.generate([1] * 600, max_new_tokens=1)


def test_text_without_tokenizer():
  need(STORIES)
  llm = Llama.from_pretrained(STORIES)
  assert len(llm.generate([1], max_new_tokens=3, eos_token_id=[]).tokens) == 3   # ids still work
  with pytest.raises(ValueError, match="no tokenizer"):
    llm.generate("hello")


def test_bad_sampling_settings(stories):
  with pytest.raises(ValueError, match="do_sample=False"):
    stories.generate("hi", do_sample=True, temperature=0.0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    stories.generate([1, 9999])


def test_cli_prints_one_line(tmp_path):
  r = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "generate", "--model", str(tmp_path / "missing"),
                      "--prompt", "x"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 1
  assert r.stderr.strip().count("\n") == 0 and "model not found" in r.stderr


def test_wrong_tokenizer_file(tmp_path):
  need(STORIES)
  bad = tmp_path / "tokenizer.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece"):
    Llama.from_pretrained(STORIES, tokenizer=bad)


def test_context_beyond_trained_warns():
  need(STORIES)
  with pytest.warns(UserWarning, match="beyond the trained context 512"):
    llm = Llama.from_pretrained(STORIES, max_seq_len=1024)
  assert llm.model.max_seq_len == 1024


def test_a_compiler_in_the_device_name_asks_for_dev():
  """tinygrad 0.14 takes the CPU's compiler from DEV at start-up only: device="CPU:LLVM" would run clang silently."""
  from tinyllama2.devices import resolve_device
  with pytest.raises(ValueError, match="DEV=CPU:LLVM"):
    resolve_device("CPU:LLVM")
  assert resolve_device("CPU") == "CPU"
