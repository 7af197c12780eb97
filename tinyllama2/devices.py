"""Which tinygrad device to run on: the one named, else the user's DEV, else the CPU."""
from __future__ import annotations

import functools
import os

# read when tinyllama2 is imported, before tinygrad picks its default device: it then writes DEV into the environment
USER_DEV: str | None = os.environ.get("DEV")


def named_compiler(device: str) -> str:
  """The compiler a device name carries ("CPU:LLVM" → "LLVM"), "" for none (a plain name, or "CL:1" naming a unit)."""
  suffix = device.partition(":")[2].upper()
  return "" if suffix.isdigit() else suffix


def resolve_device(device: str | None) -> str:
  """An explicit device, else the environment's DEV, else CPU (tinygrad alone would pick any GPU it finds); opened
  here, so a device that tinygrad lacks or that does not work on this machine is a one-line error naming those
  that do."""
  from tinygrad import Device
  name = device or USER_DEV or "CPU"
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"device must be a name such as CPU or CUDA, got {name!r}")
  if named_compiler(name) and name.upper() != (USER_DEV or "").upper():
    # tinygrad reads the compiler from DEV once, at start-up: in a device name it would be ignored without a word
    raise ValueError(f"device {name!r} names a compiler, which tinygrad takes only from the environment: run with "
                     f"DEV={name} instead")
  try: canon = Device.canonicalize(name)
  except Exception as e: raise ValueError(f"unknown device {name!r} ({e})") from None
  what = f"device {name!r}" if device else f"DEV={name}"
  if canon.partition(":")[0] not in known_devices():
    raise ValueError(f"{what}: tinygrad has no such device; devices that work here: {', '.join(usable_devices())}")
  try: Device[canon]
  except Exception as e:  # noqa: BLE001  (drivers fail in many ways: missing libraries, no hardware, permissions)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"{what} does not work on this machine ({reason}); devices that work here: "
                     f"{', '.join(usable_devices())}") from None
  return canon


@functools.cache
def known_devices() -> frozenset[str]:
  """Device names tinygrad has a runtime for (tinygrad/runtime/ops_*.py)."""
  import importlib.util
  spec = importlib.util.find_spec("tinygrad.runtime")
  folders = (spec.submodule_search_locations or []) if spec else []
  return frozenset(f.name[4:-3].upper() for d in folders for f in os.scandir(d)
                   if f.name.startswith("ops_") and f.name.endswith(".py"))


def usable_devices() -> list[str]:
  """The compute devices that open on this machine (tinygrad tries each once; a missing driver fails fast)."""
  from tinygrad import Device
  return list(dict.fromkeys(Device.get_available_devices())) or ["none"]


def child_env(device: str) -> dict[str, str]:
  """The environment of a child process that runs on `device`: DEV names it (with its compiler), and HCQ2, which
  tinygrad 0.14 cannot run with a compiler other than clang, is dropped for those."""
  env = dict(os.environ, DEV=device)
  if named_compiler(device) not in ("", "CLANG"): env.pop("HCQ2", None)
  return env
