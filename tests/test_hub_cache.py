"""Models by name: a Hugging Face repo id ("ORG/NAME") resolves in the local Hugging Face cache, with no network.
Each test builds a fake cache as huggingface_hub lays it out (blobs/<sha>, snapshots/<commit>/ symlinks, refs/main)
from the bundled model, and never lets huggingface_hub reach the network."""
import hashlib
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from tinyllama2 import DEFAULT_MODEL, Llama
from tinyllama2.checkpoint import hub, load_checkpoint
from tinyllama2.cli import main as cli

REV_A, REV_B = "a" * 40, "b" * 40


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
  """No Hugging Face setting from the machine, a fresh HOME, offline, and no importable huggingface_hub."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # `import huggingface_hub` raises ImportError


def model_files(max_positions: int = 256) -> dict[str, bytes]:
  """The bundled model's files; max_positions tells snapshots apart (ModelArgs.max_position_embeddings)."""
  files = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
  cfg = json.loads(files["config.json"])
  files["config.json"] = json.dumps(dict(cfg, max_position_embeddings=max_positions), indent=2).encode()
  return files


def add_snapshot(root: Path, repo_id: str, rev: str, files: dict[str, bytes], ref: bool = True) -> Path:
  """A snapshot as huggingface_hub writes it: content in blobs/<sha256>, snapshots/<rev>/<name> -> ../../blobs/<sha>."""
  repo = root / ("models--" + repo_id.replace("/", "--"))
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  snap = repo / "snapshots" / rev
  snap.mkdir(parents=True)
  for name, data in files.items():
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs" / sha).write_bytes(data)
    (snap / name).symlink_to(Path("..", "..", "blobs", sha))
  if ref:
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
  return snap


def greedy(llm: Llama) -> list[int]:
  return llm.generate("Once upon a time", max_new_tokens=8, do_sample=False).tokens


def test_repo_id_shape():
  for name in ("meta-llama/Llama-2-7b-chat-hf", "TheBloke/Llama-2-7B-GGUF", "org/name", "a_b/c.d"):
    assert hub.is_repo_id(name), name
  for name in ("name", "/org/name", "./org", "../org/name", "~/org", "org/name/x", ".org/name", "org/name.",
               "org/-name", "org--x/name", "org/na..me", "org/na me", "org/", "/name", ""):
    assert not hub.is_repo_id(name), name


def test_cache_root_follows_huggingface_hub(tmp_path, monkeypatch):
  assert hub.cache_root() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert hub.cache_root() == tmp_path / "xdg" / "huggingface" / "hub"
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
  assert hub.cache_root() == tmp_path / "hfhome" / "hub"
  monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))   # the older name of HF_HUB_CACHE
  assert hub.cache_root() == tmp_path / "legacy"
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
  assert hub.cache_root() == tmp_path / "hubcache"


def test_repo_id_loads_and_generates_like_the_snapshot_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  snap = add_snapshot(tmp_path / "cache", "org/name", REV_A, model_files())
  assert (snap / "model.safetensors").is_symlink() and hub.resolve("org/name") == snap
  by_name, by_path = Llama.from_pretrained("org/name"), Llama.from_pretrained(snap)
  assert Path(by_name.tokenizer.path).parent == snap   # the tokenizer beside the weights, read through its symlink
  assert greedy(by_name) == greedy(by_path) and len(greedy(by_name)) > 0


def test_refs_main_chooses_between_snapshots(tmp_path, monkeypatch):
  root = tmp_path / "cache"
  monkeypatch.setenv("HF_HUB_CACHE", str(root))
  add_snapshot(root, "org/name", REV_A, model_files(256))
  add_snapshot(root, "org/name", REV_B, model_files(128))
  assert load_checkpoint("org/name").args.max_position_embeddings == 128   # refs/main names REV_B, written last
  (root / "models--org--name" / "refs" / "main").write_text(REV_A + "\n")
  assert load_checkpoint("org/name").args.max_position_embeddings == 256
  (root / "models--org--name" / "refs" / "main").unlink()
  with pytest.raises(ValueError, match=rf"no refs/main to choose between snapshots {REV_A}, {REV_B}") as e:
    load_checkpoint("org/name")
  assert "\n" not in str(e.value)
  shutil.rmtree(root / "models--org--name" / "snapshots" / REV_A)
  assert load_checkpoint("org/name").args.max_position_embeddings == 128   # no refs/main, one snapshot: that one


def test_refs_main_naming_a_missing_snapshot_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  add_snapshot(tmp_path / "cache", "org/name", REV_A, model_files())
  (tmp_path / "cache" / "models--org--name" / "refs" / "main").write_text(REV_B)
  with pytest.raises(ValueError, match=rf"refs/main names commit '{REV_B}', but .* is missing"):
    load_checkpoint("org/name")


def test_hf_home_hub_and_hf_hub_cache_precedence(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
  snap = add_snapshot(tmp_path / "hfhome" / "hub", "org/name", REV_A, model_files(128))
  assert hub.resolve("org/name") == snap and load_checkpoint("org/name").args.max_position_embeddings == 128
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))   # wins over HF_HOME, even where it lacks the model
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "hubcache" / "models--org--name"))):
    load_checkpoint("org/name")
  add_snapshot(tmp_path / "hubcache", "org/name", REV_B, model_files(64))
  assert load_checkpoint("org/name").args.max_position_embeddings == 64


def test_default_cache_is_under_home(tmp_path):
  snap = add_snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", "org/name", REV_A, model_files())
  assert hub.resolve("org/name") == snap


def test_uncached_id_is_one_line_naming_the_folder(tmp_path):
  folder = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--meta-llama--Foo"
  with pytest.raises(ValueError) as e: Llama.from_pretrained("meta-llama/Foo")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("model 'meta-llama/Foo' is neither a path nor in the Hugging Face cache")
  assert f"(looked in {folder})" in msg and "hf download meta-llama/Foo" in msg and "HF_HUB_OFFLINE" in msg


def test_path_like_names_keep_the_not_found_error(tmp_path):
  for name in (tmp_path / "nope", f"{tmp_path}/org/name", "./org/name", "~/nope.bin"):
    with pytest.raises(FileNotFoundError, match="model not found: "): load_checkpoint(name)


def test_an_existing_relative_path_wins_over_the_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  add_snapshot(tmp_path / "cache", "x/y", REV_A, model_files(64))   # a cached repo of the same name
  (tmp_path / "work" / "x").mkdir(parents=True)
  shutil.copytree(DEFAULT_MODEL, tmp_path / "work" / "x" / "y")
  monkeypatch.chdir(tmp_path / "work")
  for name in ("./x/y", "x/y"):
    assert hub.resolve(name) == Path(name)
    assert load_checkpoint(name).args.max_position_embeddings == 256, name
  shutil.rmtree(tmp_path / "work" / "x")
  assert load_checkpoint("x/y").args.max_position_embeddings == 64   # gone: now the name is the cached repo


def test_cli_uncached_id_prints_one_error_line(capsys):
  code = cli(["generate", "--model", "org/uncached", "--prompt", "Once"])
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
  assert re.match(r"error: model 'org/uncached' is neither a path nor in the Hugging Face cache \(looked in .*"
                  r"models--org--uncached\)", lines[0]), lines[0]


def test_cli_generates_from_a_cached_id(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  snap = add_snapshot(tmp_path / "cache", "org/name", REV_A, model_files())
  code = cli(["generate", "--model", "org/name", "--prompt", "Once upon a time", "--max-new-tokens", "8",
              "--temperature", "0"])
  out = capsys.readouterr()
  assert code == 0, out.err
  expected = Llama.from_pretrained(snap).generate("Once upon a time", max_new_tokens=8, do_sample=False).text
  assert expected.strip() and out.out.strip() == expected.strip(), (out.out, expected)


def fake_hub(monkeypatch, calls: list, fail: Exception | None = None) -> None:
  """A huggingface_hub whose snapshot_download writes the snapshot a real one would, and records its arguments."""
  def snapshot_download(repo_id, allow_patterns=None, cache_dir=None):
    calls.append((repo_id, allow_patterns, cache_dir))
    if fail is not None: raise fail
    return str(add_snapshot(Path(cache_dir), repo_id, REV_A, model_files(64)))
  monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))


def test_uncached_id_is_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  calls = []
  fake_hub(monkeypatch, calls)
  with pytest.raises(ValueError, match="HF_HUB_OFFLINE"): load_checkpoint("org/name")   # offline: no download
  assert calls == []
  monkeypatch.delenv("HF_HUB_OFFLINE")
  assert load_checkpoint("org/name").args.max_position_embeddings == 64
  assert calls == [("org/name", hub.PATTERNS, str(tmp_path / "cache"))]
  assert {"*.json", "*.safetensors", "tokenizer.model"} <= set(hub.PATTERNS) and "*.bin" not in hub.PATTERNS
  load_checkpoint("org/name")
  assert len(calls) == 1   # cached now: no second download


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE")
  calls = []
  fake_hub(monkeypatch, calls, fail=OSError("401 Client Error.\n\nCannot access gated repo org/name."))
  with pytest.raises(ValueError, match=r"^could not download 'org/name' from the Hugging Face Hub: 401 Client Error\. "
                                       r"Cannot access gated repo org/name\.$"):
    load_checkpoint("org/name")


def test_without_huggingface_hub_the_error_says_how_to_download(monkeypatch):
  monkeypatch.delenv("HF_HUB_OFFLINE")   # online, but huggingface_hub is not importable (the fixture)
  with pytest.raises(ValueError, match=r"download it \(pip install huggingface_hub; hf download org/name\) or pass"):
    load_checkpoint("org/name")
