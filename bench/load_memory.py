"""Peak memory of loading a model in each checkpoint format, each in a fresh process.

  python bench/load_memory.py --shape tinyllama-1.1b --dir /tmp/ckpts
Writes random weights of the shape as llama2.c .bin, HF safetensors, GGUF and Meta .pth (fp32), then loads each
with Llama.from_pretrained on the CPU and reports peak RSS as a multiple of the weights' size.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_all(shape: str, folder: Path) -> dict[str, Path]:
  from tinyllama2.checkpoint import gguf, hf, llama2c, meta
  from tinyllama2.config import preset
  from tinyllama2.model import Transformer
  args = preset(shape).replace(max_position_embeddings=256)
  rng = np.random.default_rng(0)
  shapes = {k: tuple(v.shape) for k, v in Transformer(args, max_seq_len=8).state_dict().items()}
  weights = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
  paths = {"llama2c": folder / "model.bin", "hf": folder / "hf", "gguf": folder / "model.gguf", "meta": folder / "meta"}
  llama2c.save_v1(paths["llama2c"], args, weights)
  hf.save(paths["hf"], args, weights)
  gguf.save(paths["gguf"], args, weights)
  meta.save(paths["meta"], args, weights)
  return paths


def measure(path: Path) -> dict:
  code = ("import resource, time, sys; t = time.time(); from tinyllama2 import Llama; "
          f"llm = Llama.from_pretrained({str(path)!r}, max_seq_len=64); "
          "print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
          "sum(p.nbytes() for p in llm.model.state_dict().values()))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  seconds, rss, weights = float(out[0]), int(out[1]), int(out[2])
  return {"load_s": seconds, "peak_rss_gb": rss / 1e9, "weights_gb": weights / 1e9, "ratio": rss / weights}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="tinyllama-1.1b", help="a preset shape")
  p.add_argument("--dir", required=True, help="scratch folder for the checkpoints (several GB)")
  a = p.parse_args()
  folder = Path(a.dir)
  folder.mkdir(parents=True, exist_ok=True)
  t = time.time()
  paths = write_all(a.shape, folder)
  print(f"wrote {len(paths)} checkpoints in {time.time() - t:.0f}s", file=sys.stderr)
  print("format | load s | peak RSS GB | weights GB | RSS / weights")
  print("--- | --- | --- | --- | ---")
  for fmt, path in paths.items():
    r = measure(path)
    print(f"{fmt} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['weights_gb']:.2f} | {r['ratio']:.2f}", flush=True)


if __name__ == "__main__":
  main()
