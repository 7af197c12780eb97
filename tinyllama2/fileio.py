"""Atomic file writes: a temp file in the same folder, fsync, rename. A crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

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


# ---- output paths: checked before any work starts -----------------------------------------------
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # ours: mkstemp/mkdtemp(prefix=".NAME.", suffix=".tmp")


def is_our_temp(p: Path) -> bool:
  """A temp file or folder of one of our writes (left behind only if that write was killed)."""
  return bool(_TEMP.match(p.name))


def user_entries(folder: Path) -> list[Path]:
  """What a folder holds besides the temp files of our own interrupted writes."""
  return [p for p in folder.iterdir() if not is_our_temp(p)]


def remove_our_temps(folder: Path, name: str | None = None) -> None:
  """Delete the leftovers of interrupted writes in `folder` (only those of `name` when given)."""
  if not folder.is_dir(): return
  for p in folder.iterdir():
    if is_our_temp(p) and (name is None or p.name.startswith(f".{name}.")):
      if p.is_dir() and not p.is_symlink(): shutil.rmtree(p, ignore_errors=True)
      else:
        with contextlib.suppress(OSError): p.unlink()


def check_writable(path: Path, flag: str, shown: Path | None = None) -> None:
  """New files can be created at `path` (a folder, existing or not): probed in its nearest existing folder, which
  catches read-only mounts and permissions alike."""
  folder = Path(os.path.abspath(path))
  while not folder.exists() and folder.parent != folder: folder = folder.parent
  if not folder.is_dir(): raise NotADirectoryError(f"{flag} {shown or path}: {folder} is a file, not a folder; choose another path")
  try:
    fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise PermissionError(f"{flag} {shown or path}: cannot write in {folder} ({e.strerror}); choose another path") from None


def check_out_dir(path: str | Path, flag: str = "--out", force: bool = False) -> Path:
  """A folder to write: not a file, empty (or absent) unless force, writable."""
  path = Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"{flag} {path} is a file, but a folder is written there; remove it or choose another path")
  if path.is_dir() and user_entries(path) and not force:
    raise FileExistsError(f"{path} already exists and is not empty; choose another path or pass --force")
  check_writable(path, flag)
  return path


def check_out_file(path: str | Path, flag: str = "--out", force: bool = False) -> Path:
  """A file to write: not a folder, absent unless force, in a writable folder."""
  path = Path(path).expanduser()
  if path.is_dir(): raise IsADirectoryError(f"{flag} {path} is a folder; name a file")
  if path.exists() and not force: raise FileExistsError(f"{path} already exists; choose another path or pass --force")
  check_writable(path.parent, flag, shown=path)
  return path


def write_dir(out: str | Path, write: Callable[[Path], None]) -> None:
  """Run write(folder) on a hidden temp folder beside `out`, then move the result into place: a kill leaves `out`
  as it was (files already in an existing `out` that write() does not produce are kept)."""
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  remove_our_temps(out.parent, out.name)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)   # as mkdir would make it
  try:
    write(tmp)
    if out.is_dir() and not any(out.iterdir()): out.rmdir()
    if not out.exists(): os.rename(tmp, out)
    else:
      remove_our_temps(out)
      for f in tmp.iterdir(): os.replace(f, out / f.name)
  finally: shutil.rmtree(tmp, ignore_errors=True)


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
