"""Training data: packed plain-text corpora, Alpaca / ShareGPT instruction sets, preference pairs, and a seeded,
resumable batch order.

Every dataset becomes `Blocks`: token rows of length seq_len + 1 (inputs are [:-1], targets [1:]) and a weight
per target (1 = counts in the loss). Text blocks weigh every token; instruction data weighs the assistant turns;
a preference pair is two such rows (chosen, rejected) that weigh only the final answer (`Pairs`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..fileio import atomic_write
from ..tokenizer import ChatTemplate, Llama2ChatTemplate, Tokenizer, encode_split

DOC_SEPARATOR = "<|endoftext|>"   # TinyStories' document separator; other files are one document


@dataclass
class Blocks:
  tokens: np.ndarray    # [N, seq_len + 1] int32
  weights: np.ndarray   # [N, seq_len] float32, the loss weight of each target

  def __len__(self) -> int: return len(self.tokens)
  @property
  def seq_len(self) -> int: return self.tokens.shape[1] - 1
  @property
  def tokens_per_row(self) -> int: return self.seq_len

  def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]: return self.tokens[index], self.weights[index]

  def split(self, val_fraction: float) -> tuple[Blocks, Blocks]:
    """(train, held-out): the last val_fraction of the rows (at least one) are held out."""
    if not 0 < val_fraction < 1: raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(self) < 2: raise ValueError(f"only {len(self)} block(s) of data: too little to hold some out; "
                                       "use more data or a shorter --seq-len")
    n_val = max(1, int(round(len(self) * val_fraction)))
    return Blocks(self.tokens[:-n_val], self.weights[:-n_val]), Blocks(self.tokens[-n_val:], self.weights[-n_val:])


def cache_dir() -> Path:
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinyllama2" / "tokens"


def _read_text(path: Path) -> str:
  if not path.is_file(): raise FileNotFoundError(f"training data not found: {path}")
  try: return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e: raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def tokenize_corpus(path: str | Path, tokenizer: Tokenizer, cache: Path | None = None) -> np.ndarray:
  """The file as one token stream, every document wrapped as BOS ... EOS; cached on disk by content hash."""
  path = Path(path)
  text = _read_text(path)
  if not text.strip(): raise ValueError(f"{path}: the corpus is empty")
  key = hashlib.sha256(b"v1" + tokenizer.sp.serialized_model_proto() + text.encode()).hexdigest()
  cached = (cache or cache_dir()) / f"{key[:32]}.npy"
  if cached.is_file():
    try: return np.load(cached)
    except (OSError, ValueError): pass   # a damaged cache file is rebuilt
  docs = [d.strip() for d in text.split(DOC_SEPARATOR)] if DOC_SEPARATOR in text else [text]
  stream: list[int] = []
  for ids in tokenizer.sp.EncodeAsIds([d for d in docs if d]):
    stream += [tokenizer.bos_id, *ids, tokenizer.eos_id]
  arr = np.asarray(stream, dtype=np.int32)
  try:
    with atomic_write(cached) as f: np.save(f, arr)
  except OSError as e: warnings.warn(f"could not cache tokens in {cached}: {e}", stacklevel=2)
  return arr


def text_blocks(paths: Sequence[str | Path], tokenizer: Tokenizer, seq_len: int) -> Blocks:
  """Pack the corpora into consecutive rows of seq_len + 1 tokens (rows overlap by one token)."""
  stream = np.concatenate([tokenize_corpus(p, tokenizer) for p in paths])
  n = (len(stream) - 1) // seq_len
  if n < 1: raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {seq_len + 1}")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return Blocks(stream[idx], np.ones((n, seq_len), dtype=np.float32))


# ---- instruction data ---------------------------------------------------------------------------
def json_layout(text: str) -> str:
  """How a data file is laid out, by its first non-blank character: '[' a JSON list of records ("array"), '{' one
  JSON record per line ("jsonl"), anything else plain text ("text")."""
  return {"[": "array", "{": "jsonl"}.get(text.lstrip("\ufeff \t\r\n")[:1], "text")


def _json_error(path: Path, e: json.JSONDecodeError, how: str) -> ValueError:
  return ValueError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); {how} (for plain text "
                    "use --format text)")


def load_records(path: str | Path) -> tuple[list, str]:
  """The records of a JSON list or JSONL file and its layout ("array" or "jsonl"). A file that looks like JSON but
  does not parse is an error naming the line, never read as something else."""
  path = Path(path)
  text = _read_text(path).lstrip("\ufeff")
  layout = json_layout(text)
  if layout == "text":
    raise ValueError(f"{path}: not JSON (it does not start with '[' or '{{'); for plain text use --format text")
  if layout == "array":
    try: data = json.loads(text)
    except json.JSONDecodeError as e: raise _json_error(path, e, "a file starting with '[' is read as one JSON list") from None
    if not isinstance(data, list): raise ValueError(f"{path}: expected a JSON list of records")
    return data, layout
  records = []
  for n, line in enumerate(text.split("\n"), 1):   # not splitlines: JSON strings may hold U+2028
    if not line.strip(): continue
    try: records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == 1 and _is_one_object(text):
        raise ValueError(f"{path}: holds one JSON object; expected a JSON list of records or JSONL (one record per "
                         "line)") from None
      raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}: column {e.colno}); a file starting with '{{' is read "
                       "as JSONL, one complete record per line") from None
  return records, layout


def _is_one_object(text: str) -> bool:
  try: return isinstance(json.loads(text), dict)
  except json.JSONDecodeError: return False


def _load_records(path: Path) -> list: return load_records(path)[0]


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def record_messages(rec: object, where: str) -> list[dict]:
  """One Alpaca record ({instruction, input, output[, system, history]}) or ShareGPT record ({conversations})
  as chat messages."""
  if not isinstance(rec, dict): raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
  if "conversations" in rec:
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns: raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    msgs = []
    for j, t in enumerate(turns):
      role = t.get("from", t.get("role")) if isinstance(t, dict) else None
      content = t.get("value", t.get("content")) if isinstance(t, dict) else None
      if role not in _ROLES or not isinstance(content, str):
        raise ValueError(f"{where}: turn {j} needs 'from' (human/gpt/system) and a string 'value', got {t!r}"[:300])
      msgs.append({"role": _ROLES[role], "content": content})
    if rec.get("system"): msgs.insert(0, {"role": "system", "content": rec["system"]})
    return msgs
  if not isinstance(rec.get("instruction"), str) or not isinstance(rec.get("output"), str):
    raise ValueError(f"{where}: an Alpaca record needs string 'instruction' and 'output' fields "
                     f"(or a ShareGPT 'conversations' list); keys are {sorted(rec)}")
  msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
  for pair in rec.get("history") or []:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
      raise ValueError(f"{where}: 'history' must be a list of [user, assistant] pairs")
    msgs += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
  user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
  return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def sft_blocks(path: str | Path, tokenizer: Tokenizer, seq_len: int, template: Llama2ChatTemplate | None = None,
               limit: int | None = None) -> Blocks:
  """One row per record, rendered with the chat template, padded with EOS; only assistant tokens are weighted."""
  path = Path(path)
  template = template or Llama2ChatTemplate()
  rows, weights, truncated, dropped, longest = [], [], 0, 0, 0
  records = _load_records(path)[:limit]
  if not records: raise ValueError(f"{path}: holds no records")
  for i, rec in enumerate(records):
    where = f"{path} record {i}"
    try: ids, mask = template.encode_for_training(record_messages(rec, where), tokenizer)
    except ValueError as e:
      raise ValueError(str(e) if str(e).startswith(str(path)) else f"{where}: {e}") from None
    longest = max(longest, len(ids))
    if len(ids) > seq_len + 1: ids, mask, truncated = ids[:seq_len + 1], mask[:seq_len + 1], truncated + 1
    w = np.zeros(seq_len, dtype=np.float32)
    w[:len(ids) - 1] = mask[1:]
    if not w.any():   # the answer was cut off entirely: nothing of it to learn
      dropped += 1
      continue
    rows.append(ids + [tokenizer.eos_id] * (seq_len + 1 - len(ids)))
    weights.append(w)
  why = (f"their answer starts after the first {seq_len + 1} tokens (--seq-len {seq_len}), so no answer token "
         f"is left to train on; the longest record has {longest} tokens")
  if not rows: raise ValueError(f"{path}: no usable records: all {len(records)} dropped, {why}; raise --seq-len")
  if dropped: warnings.warn(f"{path}: {dropped} of {len(records)} records dropped: {why}; raise --seq-len to keep them",
                            stacklevel=2)
  if truncated > dropped:
    warnings.warn(f"{path}: {truncated - dropped} record(s) longer than {seq_len + 1} tokens were truncated "
                  f"(the longest has {longest})", stacklevel=2)
  return Blocks(np.asarray(rows, dtype=np.int32), np.stack(weights))


# ---- preference pairs ---------------------------------------------------------------------------
@dataclass
class Preference:
  """One preference record: a prompt (chat messages, or plain text), the preferred and the other answer, and the
  margin by which chosen should score higher (trl's optional `margin` column; 0 without)."""
  prompt: list[dict] | str
  chosen: str
  rejected: str
  margin: float = 0.0


def _answer_text(value: object, where: str, key: str) -> str:
  """An answer given as a string, one message ({"role"/"from", "content"/"value"}) or a list of one message."""
  if isinstance(value, list) and len(value) == 1: value = value[0]
  if isinstance(value, dict): value = value.get("content", value.get("value"))
  if not isinstance(value, str):
    raise ValueError(f"{where}: '{key}' must be a string, one assistant message, or a list of one, got {value!r}"[:300])
  return value


def _implicit_prompt(chosen: list, rejected: list, where: str) -> tuple[list[dict], str, str]:
  """trl's implicit prompt: chosen and rejected are whole conversations; the prompt is what they share."""
  n = 0
  while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]: n += 1
  if n == 0 or len(chosen) != n + 1 or len(rejected) != n + 1:
    raise ValueError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that differ only "
                     "in their last (assistant) message")
  return record_messages({"conversations": chosen[:n]}, where), _answer_text(chosen[n], where, "chosen"), \
    _answer_text(rejected[n], where, "rejected")


def preference_record(rec: object, where: str) -> Preference:
  """trl's preference formats ({"prompt", "chosen", "rejected"} as strings or message lists, or implicit prompt:
  only "chosen"/"rejected" conversations) and LLaMA-Factory's ShareGPT preference format ("conversations" with
  "chosen"/"rejected" assistant messages and an optional "system")."""
  if not isinstance(rec, dict): raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
  if "chosen" not in rec or "rejected" not in rec:
    raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' (with 'prompt' or 'conversations'); "
                     f"keys are {sorted(rec)}")
  margin = rec.get("margin", 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)): raise ValueError(f"{where}: 'margin' must be a number")
  if "conversations" in rec: prompt: list[dict] | str = record_messages(rec, where)
  elif "prompt" not in rec:
    if not (isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list)):
      raise ValueError(f"{where}: without 'prompt' (or 'conversations'), 'chosen' and 'rejected' must be message lists")
    prompt, chosen, rejected = _implicit_prompt(rec["chosen"], rec["rejected"], where)
    return Preference(prompt, chosen, rejected, float(margin))
  elif isinstance(rec["prompt"], str): prompt = rec["prompt"]
  elif isinstance(rec["prompt"], list): prompt = record_messages({"conversations": rec["prompt"]}, where)
  else: raise ValueError(f"{where}: 'prompt' must be a string or a list of messages")
  if isinstance(prompt, list) and prompt[-1]["role"] != "user":
    raise ValueError(f"{where}: the prompt must end with a user message, it ends with {prompt[-1]['role']!r}")
  return Preference(prompt, _answer_text(rec["chosen"], where, "chosen"), _answer_text(rec["rejected"], where, "rejected"),
                    float(margin))


def encode_answer(prompt: list[dict] | str, answer: str, tokenizer: Tokenizer,
                  template: ChatTemplate) -> tuple[list[int], list[int]]:
  """(ids, mask) of prompt + answer + EOS, the mask 1 on the final answer and EOS only: a conversation goes through
  the chat template (earlier assistant turns are prompt), a plain-text prompt is followed by the answer directly."""
  if isinstance(prompt, str): return encode_split(prompt, answer, tokenizer, True, True)
  ids, _ = template.encode_for_training(prompt + [{"role": "assistant", "content": answer}], tokenizer)
  head = template.encode(prompt, tokenizer)
  n = 0
  while n < min(len(head), len(ids)) and head[n] == ids[n]: n += 1
  return ids, [0] * n + [1] * (len(ids) - n)


@dataclass
class Pairs:
  """Preference pairs as two aligned Blocks (row i of `chosen` and of `rejected` answer the same prompt), the index
  of each row's last real token (where a reward model reads its score) and each pair's margin."""
  chosen: Blocks
  rejected: Blocks
  chosen_last: np.ndarray     # [N] int32
  rejected_last: np.ndarray   # [N] int32
  margin: np.ndarray          # [N] float32

  def __len__(self) -> int: return len(self.chosen)
  @property
  def seq_len(self) -> int: return self.chosen.seq_len

  def split(self, val_fraction: float) -> tuple[Pairs, Pairs]:
    """(train, held-out): the last val_fraction of the pairs (at least one) are held out."""
    if not 0 < val_fraction < 1: raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(self) < 2: raise ValueError(f"only {len(self)} usable pair(s): too few to hold some out; add data")
    k = len(self) - max(1, int(round(len(self) * val_fraction)))
    return self.select(np.arange(k)), self.select(np.arange(k, len(self)))

  def select(self, index: np.ndarray) -> Pairs:
    return Pairs(Blocks(self.chosen.tokens[index], self.chosen.weights[index]),
                 Blocks(self.rejected.tokens[index], self.rejected.weights[index]),
                 self.chosen_last[index], self.rejected_last[index], self.margin[index])


def preference_pairs(path: str | Path, tokenizer: Tokenizer, seq_len: int, template: ChatTemplate | None = None,
                     limit: int | None = None) -> Pairs:
  """Read and tokenize a preference file (JSON list or JSONL; see preference_record): rows of seq_len + 1 tokens
  padded with EOS. A pair whose answers both start beyond the row is dropped, with a warning."""
  path = Path(path)
  template = template or Llama2ChatTemplate()
  records = _load_records(path)[:limit]
  if not records: raise ValueError(f"{path}: holds no records")
  rows: dict[str, list] = {"ct": [], "cw": [], "rt": [], "rw": [], "cl": [], "rl": [], "m": []}
  dropped = truncated = 0
  for i, rec in enumerate(records):
    where = f"{path} record {i}"
    pref = preference_record(rec, where)
    try:
      encoded = [encode_answer(pref.prompt, a, tokenizer, template) for a in (pref.chosen, pref.rejected)]
    except ValueError as e: raise ValueError(f"{where}: {e}") from None
    padded = [_padded_row(ids, mask, seq_len, tokenizer.eos_id) for ids, mask in encoded]
    if not (padded[0][1].any() and padded[1][1].any()):
      dropped += 1
      continue
    truncated += any(len(ids) > seq_len + 1 for ids, _ in encoded)
    for key, (tokens, weights, last) in zip(("c", "r"), padded):
      rows[key + "t"].append(tokens), rows[key + "w"].append(weights), rows[key + "l"].append(last)
    rows["m"].append(pref.margin)
  if not rows["ct"]:
    raise ValueError(f"{path}: no usable pairs: in all {len(records)} the answers start after the first {seq_len + 1} "
                     f"tokens (--seq-len {seq_len}); raise --seq-len")
  if dropped: warnings.warn(f"{path}: {dropped} of {len(records)} pairs dropped: their answers start after the first "
                            f"{seq_len + 1} tokens; raise --seq-len to keep them", stacklevel=2)
  if truncated: warnings.warn(f"{path}: {truncated} pair(s) longer than {seq_len + 1} tokens were truncated", stacklevel=2)
  arr = lambda k, dt: np.asarray(rows[k], dtype=dt)
  return Pairs(Blocks(arr("ct", np.int32), arr("cw", np.float32)), Blocks(arr("rt", np.int32), arr("rw", np.float32)),
               arr("cl", np.int32), arr("rl", np.int32), arr("m", np.float32))


def _padded_row(ids: list[int], mask: list[int], seq_len: int, pad: int) -> tuple[list[int], np.ndarray, int]:
  """(tokens padded or cut to seq_len + 1, the weight of each target, index of the last real token)."""
  ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
  w = np.zeros(seq_len, dtype=np.float32)
  w[:len(ids) - 1] = mask[1:]
  return ids + [pad] * (seq_len + 1 - len(ids)), w, len(ids) - 1


# ---- batch order --------------------------------------------------------------------------------
class BatchOrder:
  """Seeded shuffled order of rows, epoch by epoch; its state (epoch, index) makes a resumed run see the same
  batches an uninterrupted one would."""

  def __init__(self, n_rows: int, batch_size: int, seed: int):
    if n_rows < batch_size:
      raise ValueError(f"only {n_rows} training rows for a batch of {batch_size}: lower --batch-size or add data")
    self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
    self.epoch, self.index = 0, 0

  def _perm(self) -> np.ndarray: return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)

  def next(self) -> np.ndarray:
    if self.index + self.batch_size > self.n_rows: self.epoch, self.index = self.epoch + 1, 0
    rows = self._perm()[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return rows

  def state(self) -> dict: return {"epoch": self.epoch, "index": self.index}
  def load_state(self, s: dict) -> None: self.epoch, self.index = int(s["epoch"]), int(s["index"])
