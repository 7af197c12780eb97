"""Which tinygrad device to run on: the one named, else the user's DEV, else the CPU."""
from __future__ import annotations

import os

# read when tinyllama2 is imported, before tinygrad picks its default device: it then writes DEV into the environment
USER_DEV: str | None = os.environ.get("DEV")


def named_compiler(device: str) -> str:
  """The compiler a device name carries ("CPU:LLVM" → "LLVM"), "" for none (a plain name, or "CL:1" naming a unit)."""
  suffix = device.partition(":")[2].upper()
  return "" if suffix.isdigit() else suffix


def resolve_device(device: str | None) -> str:
  """An explicit device, else the environment's DEV, else CPU (tinygrad alone would pick any GPU it finds)."""
  from tinygrad import Device
  name = device or USER_DEV or "CPU"
  if named_compiler(name) and name.upper() != (USER_DEV or "").upper():
    # tinygrad reads the compiler from DEV once, at start-up: in a device name it would be ignored without a word
    raise ValueError(f"device {name!r} names a compiler, which tinygrad takes only from the environment: run with "
                     f"DEV={name} instead")
  try: return Device.canonicalize(name)
  except Exception as e: raise ValueError(f"unknown device {name!r} ({e})") from None


def child_env(device: str) -> dict[str, str]:
  """The environment of a child process that runs on `device`: DEV names it (with its compiler), and HCQ2, which
  tinygrad 0.14 cannot run with a compiler other than clang, is dropped for those."""
  env = dict(os.environ, DEV=device)
  if named_compiler(device) not in ("", "CLANG"): env.pop("HCQ2", None)
  return env
