import json
import os
from pathlib import Path

import numpy as np
import pytest

import tinyllama2  # noqa: F401  (first: it picks tinygrad's CPU runtime before tinygrad is imported)

SHARED = Path(os.environ.get("TINYLLAMA2_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES = SHARED / "models" / "stories260K.bin"
STORIES_V1 = SHARED / "models" / "stories260K_v1.bin"
TOK512 = SHARED / "tokenizers" / "tok512.model"
LLAMA_TOK = SHARED / "tokenizers" / "llama2_tokenizer.model"
REFERENCE = SHARED / "reference" / "stories260K_reference.json"
REF_LOGITS = SHARED / "reference" / "stories260K_greedy_bos_logits_200x512_f32.npy"


def need(*paths: Path) -> None:
  missing = [str(p) for p in paths if not p.exists()]
  if missing: pytest.skip(f"shared test data not found: {', '.join(missing)} (set TINYLLAMA2_SHARED)")


@pytest.fixture(scope="session")
def reference() -> dict:
  need(REFERENCE)
  return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def ref_logits() -> np.ndarray:
  need(REF_LOGITS)
  return np.load(REF_LOGITS)


@pytest.fixture(scope="session")
def stories():
  """stories260K on the default device (DEV, else CPU), shared by the tests of a session."""
  need(STORIES, TOK512)
  from tinyllama2 import Llama
  return Llama.from_pretrained(STORIES, tokenizer=TOK512)
