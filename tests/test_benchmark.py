"""bench's bookkeeping: the llama.cpp reference gets our weights, ratios and GB/s are computed right."""
import numpy as np
import pytest

from tinyllama2 import ModelArgs, Transformer
from tinyllama2.benchmark import BenchResult, _custom_kernel_gb_s, format_table
from tinyllama2.checkpoint import gguf
from tinyllama2.quantize import float_weights, quantize_model


@pytest.mark.parametrize("mode,file_type", [("int8", "q8_0"), ("int4", "q4_0")])
def test_the_reference_gguf_holds_our_blocks(tmp_path, mode, file_type):
  """The GGUF written for llama.cpp from a quantized model holds exactly the model's blocks (no requantization
  drift), so both sides decode the same weights."""
  args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, hidden_dim=96, max_position_embeddings=16)
  model = Transformer(args, device="CPU")
  model.init_random(seed=2)
  quantize_model(model, mode)
  path = tmp_path / "m.gguf"
  gguf.save(path, args, float_weights(model), dtype=file_type)
  _, loaded = gguf.load(path)
  wq = model.layers[0].attention.wq
  np.testing.assert_array_equal(loaded["layers.0.attention.wq.weight"].packed, wq.packed.numpy())
  np.testing.assert_array_equal(loaded["layers.0.attention.wq.weight"].scale, wq.scale.numpy())
  np.testing.assert_array_equal(loaded["norm.weight"], model.norm.weight.numpy())


def test_table_ratios_against_llama_cpp():
  row = BenchResult(model="m", device="CPU", dtype="float32", params_m=1, weight_mb=10, prefill_tok_s=300, decode_tok_s=90,
                    ttft_cold_s=1, ttft_warm_s=0.1, peak_rss_mb=1, device_mem_mb=0, bandwidth_gb_s=10,
                    decode_frac_of_bw=0.09, kernels_per_token=10, llama_cpp_prefill_tok_s=600, llama_cpp_decode_tok_s=100)
  cells = format_table([row]).splitlines()[-1].split(" | ")
  assert cells[-4:] == ["600.0", "100.0", "0.50", "0.90"]


def test_gb_s_of_our_cpu_kernels_from_their_names():
  assert _custom_kernel_gb_s("matvec_f32_1000_250", 1.0) == 1000 * 250 * 4 / 1e3
  assert _custom_kernel_gb_s("swiglu_f16_768_288", 1.0) == 2 * 768 * 288 * 2 / 1e3   # gate and up
  assert _custom_kernel_gb_s("norm_matvec3_q8_0_864_288", 1.0) == 864 * 288 * 34 / 32 / 1e3   # RMSNorm fused in
  assert _custom_kernel_gb_s("matvec_f16_288_768_res", 1.0) == 288 * 768 * 2 / 1e3            # residual fused in
  assert _custom_kernel_gb_s("r_16_18", 1.0) is None


def test_a_device_named_with_its_compiler_is_benched_with_dev_set(monkeypatch):
  """tinygrad takes the CPU's compiler from DEV (CPU:LLVM), not from a device name: bench must set DEV for it,
  even when it is the only row."""
  import argparse
  import dataclasses
  import json
  import subprocess
  from tinyllama2.cli import bench
  from tinyllama2.cli.bench import _runs_here, add_args as add_bench_args, main
  monkeypatch.delenv("DEV", raising=False)
  monkeypatch.setenv("HCQ2", "1")   # as tinyllama2 sets it for the clang CPU
  assert _runs_here(None) and _runs_here("CPU") and _runs_here("CL:1") and not _runs_here("CPU:LLVM")
  monkeypatch.setattr(bench, "measure_read_bandwidth", lambda: 10.0)
  seen = []
  row = BenchResult(model="stories260K", device="CPU:LLVM", dtype="float32", params_m=1, weight_mb=1, prefill_tok_s=1,
                    decode_tok_s=1, ttft_cold_s=1, ttft_warm_s=1, peak_rss_mb=1, device_mem_mb=0, bandwidth_gb_s=10,
                    decode_frac_of_bw=0.1, kernels_per_token=1)
  def fake_run(cmd, env=None, **kwargs):
    seen.append((cmd, env))
    return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps([dataclasses.asdict(row)]), stderr="")
  monkeypatch.setattr(subprocess, "run", fake_run)
  p = argparse.ArgumentParser()
  add_bench_args(p)
  rows = main(p.parse_args(["--model", "stories260K", "--device", "CPU:LLVM", "--json", "-"]))
  assert rows == [row] and len(seen) == 1
  cmd, env = seen[0]
  assert env["DEV"] == "CPU:LLVM" and "HCQ2" not in env and cmd[cmd.index("--device") + 1] == "CPU:LLVM"


def test_concurrency_measures_the_window_where_every_request_decodes():
  """Aggregate decode rate counts only tokens that arrive while all requests decode; TTFT is from submission."""
  from tinyllama2.concurrency_bench import _measure, prompt_lengths
  submitted = [0.0, 0.0]
  arrivals = [[1.0, 1.1, 1.2, 1.3, 1.4], [1.2, 1.25, 1.3, 1.35, 1.4, 1.45]]   # the second starts at 1.2, the first ends at 1.4
  rate, ttft, gaps = _measure(submitted, arrivals)
  assert rate == pytest.approx((2 + 4) / 0.2) and ttft == [1.0, 1.2] and len(gaps) == 4 + 5
  assert prompt_lengths(5, 128) == [32, 64, 96, 128, 32]


def test_bench_concurrency_runs_each_level_and_compares_with_one_stream():
  import json
  import subprocess
  import sys
  run = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "bench", "--model", "stories260K", "--concurrency", "1,3",
                        "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1", "--json", "-"],
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(run.stdout)
  assert [r["concurrency"] for r in rows] == [1, 3] and rows[0]["vs_single"] == 1.0
  assert all(r["decode_tok_s"] > 0 and r["ttft_max_s"] >= r["ttft_p50_s"] > 0 and r["itl_p95_ms"] >= r["itl_p50_ms"]
             for r in rows)
  bad = subprocess.run([sys.executable, "-m", "tinyllama2.cli", "bench", "--concurrency", "0,2"], capture_output=True, text=True)
  assert bad.returncode == 2 and "positive integers" in bad.stderr


def test_torch_reference_train_step_runs():
  """bench/torch_train_step.py (train_speed.py --torch's reference) trains a tiny transformers Llama and reports
  its tokens/s."""
  pytest.importorskip("torch", reason="the PyTorch reference needs torch and transformers (the dev extra)")
  pytest.importorskip("transformers", reason="the PyTorch reference needs torch and transformers (the dev extra)")
  import json
  import subprocess
  import sys
  from pathlib import Path
  from tinyllama2.config import to_hf_config
  args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=48, max_position_embeddings=16)
  script = Path(__file__).resolve().parents[1] / "bench" / "torch_train_step.py"
  done = subprocess.run([sys.executable, str(script), json.dumps(to_hf_config(args)), "--seq-len", "16",
                         "--batch-size", "2", "--steps", "2", "--threads", "1"], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"] > 0
