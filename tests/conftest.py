import json
import os
from pathlib import Path

import numpy as np
import pytest

import tinyllama2  # noqa: F401  (first: it picks tinygrad's CPU runtime before tinygrad is imported)
from tinygrad import Device  # noqa: E402
from tinyllama2.devices import USER_DEV  # noqa: E402

# tinygrad writes the default device it picks (e.g. CL, where PoCL is installed) into DEV for its child processes;
# the commands our tests run as subprocesses must see the user's DEV (else run on the CPU, as a user's would), so it
# is picked now, once, and DEV put back
Device.DEFAULT
if USER_DEV is None: os.environ.pop("DEV", None)
else: os.environ["DEV"] = USER_DEV

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


def decode_steps_fused_and_layer_by_layer(args, dtype, mode: str | None, device: str) -> tuple[tuple, tuple]:
  """Four decode steps of a seeded model (quantized by `mode`) after a 3-token prefill, once through the fused
  decode step and once through tinygrad's layer-by-layer graph: for each, (logits, KV caches as float32 arrays,
  kernels per decode step)."""
  from tinyllama2 import Transformer
  from tinyllama2.benchmark import _kernels_per_decode_step
  from tinyllama2.decoder import Decoder
  from tinyllama2.quantize import quantize_model
  def run(fused: bool):
    m = Transformer(args, max_seq_len=24, dtype=dtype, device=device)
    m.init_random(seed=1, std=0.2)
    if mode: quantize_model(m, mode)
    dec, logits = Decoder(m, fused=fused, replay=False), []
    dec.prefill([3, 17, 42], all_logits=True)
    for i, tok in enumerate([5, 9, 11, 12]): logits.append(dec.decode_logits(tok, 3 + i).numpy())
    caches = [c.k.float().numpy() for c in dec.slot_caches()] + [c.v.float().numpy() for c in dec.slot_caches()]
    return np.concatenate(logits), caches, _kernels_per_decode_step(dec, 13, 7)
  return run(True), run(False)


@pytest.fixture(scope="session")
def bundled_server():
  """`tinyllama2 serve` on the bundled model (4 slots), shared by the server tests of a session."""
  from serving import Server
  server = Server("--slots", "4", "--model-alias", "bundled")
  yield server
  assert server.stop() == 0, "".join(server.stderr)


@pytest.fixture(scope="session")
def stories_server():
  need(STORIES, TOK512)
  from serving import Server
  server = Server("--model", str(STORIES), "--tokenizer", str(TOK512), "--slots", "2")
  yield server
  assert server.stop() == 0, "".join(server.stderr)
