"""The parity test on OpenCL (PoCL) and a smoke test on tinygrad's pure-Python backend."""
import numpy as np
import pytest

from conftest import STORIES, TOK512, need
from tinyllama2 import Llama, ModelArgs, Transformer


def available(device: str) -> bool:
  from tinygrad import Device
  try:
    Device[device]
    return True
  except Exception:
    return False


def test_opencl_parity(reference, ref_logits):
  if not available("CL"): pytest.skip("no OpenCL device (install pocl-opencl-icd)")
  need(STORIES, TOK512)
  llm = Llama.from_pretrained(STORIES, tokenizer=TOK512, device="CL")
  assert llm.model.device.startswith("CL")
  run = reference["runc_generated"]["runs"][0]
  assert np.abs(llm.logits(run["tokens"][:200]) - ref_logits).max() < 1e-4
  g = llm.generate([1], max_new_tokens=64, eos_token_id=1)
  assert g.tokens == run["tokens"][1:65]


def test_python_backend_smoke():
  args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, hidden_dim=24, max_position_embeddings=8)
  cpu = Transformer(args, device="CPU")
  cpu.init_random(seed=1, std=0.3)
  py = Transformer(args, device="PYTHON")
  py.load_weights({k: v.numpy() for k, v in cpu.state_dict().items()})
  tokens = [1, 4, 7]
  np.testing.assert_allclose(Llama(py, None).logits(tokens), Llama(cpu, None).logits(tokens), atol=1e-5)
  assert len(Llama(py, None).generate(tokens, max_new_tokens=2, eos_token_id=[]).tokens) == 2
