"""Atomic file writes: a temp file in the same folder, fsync, rename. A crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would make the result private, unlike a normally written file
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError): os.unlink(tmp)
    raise


def write_text(path: str | Path, text: str) -> None:
  with atomic_write(path, "w") as f: f.write(text)


def release_mapped(arr) -> None:
  """Drop the resident pages of a read-only memory-mapped array once its data has been copied elsewhere, so a
  loaded checkpoint does not count twice in the process's memory. Pages are re-read from the file if touched."""
  base = arr
  while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap): base = getattr(base, "base", None)
  if base is None or not hasattr(mmap, "MADV_DONTNEED"): return
  mm = base._mmap
  try: start_addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
  except (ValueError, TypeError): return
  page = mmap.PAGESIZE
  lo = (arr.ctypes.data - start_addr) // page * page
  hi = arr.ctypes.data - start_addr + arr.nbytes
  if lo < 0 or hi > len(mm): return
  with contextlib.suppress(OSError, ValueError): mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
