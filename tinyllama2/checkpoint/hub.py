"""Models by name: a Hugging Face repo id ("ORG/NAME") found in the local Hugging Face cache, with no network.

The cache is huggingface_hub's: <cache>/models--ORG--NAME/snapshots/<commit>/ holds the files (usually symlinks into
../../blobs/), and refs/main names the commit to use. A repo that is not cached is downloaded only with the optional
`hub` extra (huggingface_hub) installed and HF_HUB_OFFLINE unset; an existing path always wins over a repo id.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"   # Hugging Face's rule: no leading/trailing '.' or '-'
REPO_ID = re.compile(f"{_PART}/{_PART}")
# What load_checkpoint reads: HF config + safetensors + tokenizer, or a Meta checkpoint; not the PyTorch .bin copies.
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "consolidated.*.pth"]
_TRUE = ("1", "ON", "YES", "TRUE")


FILE_SUFFIXES = (".gguf", ".bin", ".pth", ".safetensors", ".model", ".json")   # `dir/file.bin` is a mistyped path


def is_repo_id(name: str) -> bool:
  """True for names shaped like a Hugging Face model id, ORG/NAME ('--' and '..' are not allowed in one), unless
  they end like one of the files we read."""
  return REPO_ID.fullmatch(name) is not None and "--" not in name and ".." not in name and \
    not name.lower().endswith(FILE_SUFFIXES)


def cache_root() -> Path:
  """huggingface_hub's cache folder: $HF_HUB_CACHE (or the older $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else
  ~/.cache/huggingface/hub ($XDG_CACHE_HOME/huggingface/hub when XDG_CACHE_HOME is set)."""
  env = os.environ.get
  hub = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE")
  if hub: return Path(hub).expanduser()
  home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return Path(home).expanduser() / "hub"


def repo_folder(repo_id: str) -> Path:
  return cache_root() / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo: Path) -> Path | None:
  """The snapshot refs/main names, else the only snapshot; None when the repo has none."""
  snaps, ref = repo / "snapshots", repo / "refs" / "main"
  if ref.is_file():
    rev = ref.read_text().strip()
    if not (snaps / rev).is_dir():
      raise ValueError(f"{ref} names commit {rev!r}, but {snaps / rev} is missing; download the model again")
    return snaps / rev
  found = sorted(p.name for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else []
  if len(found) > 1:
    raise ValueError(f"{repo}: no refs/main to choose between snapshots {', '.join(found)}; pass the one to use as a "
                     f"path ({snaps}/COMMIT)")
  return snaps / found[0] if found else None


def offline() -> bool: return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def download(repo_id: str) -> Path | None:
  """The repo's snapshot, fetched with huggingface_hub (only the files we read); None when huggingface_hub is not
  installed or HF_HUB_OFFLINE is set."""
  if offline(): return None
  try: from huggingface_hub import snapshot_download
  except ImportError: return None
  try: return Path(snapshot_download(repo_id, allow_patterns=PATTERNS, cache_dir=str(cache_root())))
  except Exception as e:  # noqa: BLE001  (network, auth, a repo that does not exist: one line for the user)
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    raise ValueError(f"could not download {repo_id!r} from the Hugging Face Hub: {msg}") from None


def resolve(name: str | Path) -> Path:
  """`name` as a path if it exists or does not look like ORG/NAME; otherwise the snapshot folder of that Hugging Face
  repo in the local cache (downloaded first when huggingface_hub is installed and HF_HUB_OFFLINE is not set)."""
  name = str(name)
  path = Path(name).expanduser()
  if path.exists() or not is_repo_id(name): return path
  repo = repo_folder(name)
  snap = cached_snapshot(repo) or download(name)
  if snap is not None: return snap
  how = "with HF_HUB_OFFLINE unset: " if offline() else "pip install huggingface_hub; "
  raise ValueError(f"model {name!r} is neither a path nor in the Hugging Face cache (looked in {repo}); "
                   f"download it ({how}hf download {name}) or pass a path")
