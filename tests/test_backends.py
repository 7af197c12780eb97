"""The parity test on OpenCL (PoCL) and on the CPU with tinygrad's LLVM compiler, and a smoke test on tinygrad's
pure-Python backend."""
import json
import os
import subprocess
import sys

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


_LLVM_RUN = """
import ctypes, json, os, sys
try:   # tinygrad 0.14 writes IR with opaque pointers: libLLVM 15 (Debian 12's default) rejects it, 19 takes it
  from tinygrad.runtime.autogen import llvm
  major = ctypes.c_uint()
  ctypes.CDLL(llvm.dll._name).LLVMGetVersion(ctypes.byref(major), ctypes.byref(ctypes.c_uint()), ctypes.byref(ctypes.c_uint()))
  assert major.value >= 17, f"libLLVM {major.value} is too old"
except Exception as e: print(f"no usable libLLVM: {type(e).__name__}: {str(e)[:200]}"); sys.exit(3)
from tinyllama2 import Llama
llm = Llama.from_pretrained(sys.argv[1], tokenizer=sys.argv[2])
tokens = json.loads(sys.argv[3])
logits = llm.logits(tokens)
generated = llm.generate([1], max_new_tokens=32, eos_token_id=1).tokens
print(json.dumps({"device": llm.model.device, "hcq2": os.environ.get("HCQ2"), "logits": logits.tolist(), "generated": generated}))
"""


def test_llvm_parity(reference, ref_logits):
  """DEV=CPU:LLVM: tinygrad's LLVM compiler instead of clang, so our C kernels and the HCQ2 queue (whose program
  LLVM does not render in tinygrad 0.14) step aside and tinygrad's own kernels must give llama2.c's numbers."""
  need(STORIES, TOK512)
  run = reference["runc_generated"]["runs"][0]
  proc = subprocess.run([sys.executable, "-c", _LLVM_RUN, str(STORIES), str(TOK512), json.dumps(run["tokens"][:40])],
                        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "HCQ2"} | {"DEV": "CPU:LLVM"})
  if proc.returncode == 3: pytest.skip(proc.stdout.strip() + " (Debian 12: apt-get install libllvm19)")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["device"].startswith("CPU") and out["hcq2"] is None
  assert np.abs(np.array(out["logits"]) - ref_logits[:40]).max() < 1e-4
  assert out["generated"] == run["tokens"][1:33]
