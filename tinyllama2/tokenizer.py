"""SentencePiece tokenizer wrapper and chat templates (Llama-2 `[INST]` format and plain completion)."""
from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer:
  """A SentencePiece BPE model (Llama-2's or one trained with `vocab.py`)."""

  def __init__(self, model_path: str | Path):
    import sentencepiece as spm
    path = Path(model_path).expanduser()
    if not path.is_file(): raise FileNotFoundError(f"tokenizer not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try: self.sp.Load(str(path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a SentencePiece tokenizer model ({str(e).splitlines()[0]})") from None

  @classmethod
  def from_proto(cls, proto: bytes, source: str | Path) -> Tokenizer:
    """From a serialized SentencePiece ModelProto (e.g. built from a GGUF file's vocabulary)."""
    import sentencepiece as spm
    tok = cls.__new__(cls)
    tok.path, tok.sp = Path(source), spm.SentencePieceProcessor()
    try: tok.sp.LoadFromSerializedProto(proto)
    except RuntimeError as e: raise ValueError(f"{source}: invalid tokenizer data ({str(e).splitlines()[0]})") from None
    return tok

  @property
  def vocab_size(self) -> int: return self.sp.vocab_size()
  @property
  def bos_id(self) -> int: return self.sp.bos_id()
  @property
  def eos_id(self) -> int: return self.sp.eos_id()

  def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
    if not isinstance(text, str): raise TypeError(f"encode expects a str, got {type(text).__name__}")
    check_utf8(text)
    ids = self.sp.EncodeAsIds(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def _known(self, i: int) -> int:
    """An id the tokenizer has; a model's vocabulary may have more rows than its tokenizer pieces (padding rows,
    or a tokenizer that is not the model's), and such ids decode as the unknown piece instead of failing."""
    return i if 0 <= i < self.vocab_size else max(self.sp.unk_id(), 0)

  def decode(self, ids: Sequence[int]) -> str: return self.sp.DecodeIds([self._known(int(i)) for i in ids])

  def id_to_piece(self, i: int) -> str: return self.sp.IdToPiece(self._known(int(i)))

  def piece_bytes(self, i: int) -> bytes:
    """The bytes token i stands for: a byte-fallback piece `<0xHH>` that byte, '▁' a space."""
    return piece_bytes(self.id_to_piece(i))


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def piece_bytes(piece: str) -> bytes:
  """A SentencePiece piece as the bytes it stands for (byte-fallback pieces `<0xHH>` their byte, '▁' a space)."""
  if m := _BYTE_PIECE.fullmatch(piece): return bytes([int(m.group(1), 16)])
  return piece.replace("\u2581", " ").encode("utf-8")


def check_utf8(text: str, what: str = "the text") -> None:
  """Text from the command line or a terminal that was not UTF-8 reaches Python with lone surrogates (bytes it
  could not decode); sentencepiece would fail on them deep inside."""
  try: text.encode("utf-8")
  except UnicodeEncodeError as e:
    code = ord(text[e.start])
    bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    raise ValueError(f"{what} is not valid UTF-8 ({bad} at character {e.start}); pass UTF-8 text "
                     "(e.g. convert it with iconv)") from None


class ChatTemplate(Protocol):
  """Turns [{"role", "content"}, ...] ending with a user message into prompt ids. Add your own by implementing it
  (`encode_for_training` is needed only for fine-tuning on chat data)."""
  def encode(self, messages: list[dict], tokenizer: Tokenizer) -> list[int]: ...
  def encode_for_training(self, messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]: ...


def encode_split(prompt: str, answer: str, tokenizer: Tokenizer, bos: bool, eos: bool) -> tuple[list[int], list[int]]:
  """ids of prompt + answer encoded together, and a 0/1 mask that is 1 on the answer's tokens (and EOS)."""
  ids = tokenizer.encode(prompt + answer, bos=bos, eos=eos)
  head = tokenizer.encode(prompt, bos=bos, eos=False)
  n = 0
  while n < min(len(head), len(ids)) and head[n] == ids[n]: n += 1   # where the answer's tokens begin
  return ids, [0] * n + [1] * (len(ids) - n)


def _check_messages(messages: list[dict]) -> list[dict]:
  if not messages: raise ValueError("chat needs at least one message")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    if m["role"] not in ("system", "user", "assistant"):
      raise ValueError(f"message {i}: unknown role {m['role']!r} (use system, user or assistant)")
  return messages


@dataclass(frozen=True)
class Llama2ChatTemplate:
  """Meta's Llama-2 chat format, built as its reference `chat_completion` builds it.

  Per finished turn: [BOS] "[INST] {user} [/INST] {answer} " [EOS]; the open turn: [BOS] "[INST] {user} [/INST]".
  A system prompt goes into the first user message as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n".
  """
  def encode(self, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    msgs = self._turns(messages)
    if msgs[-1]["role"] != "user": raise ValueError("the last chat message must be from the user")
    ids: list[int] = []
    for user, answer in zip(msgs[0::2], msgs[1::2]):
      ids += tokenizer.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ", bos=True, eos=True)
    return ids + tokenizer.encode(f"[INST] {msgs[-1]['content'].strip()} [/INST]", bos=True, eos=False)

  def encode_for_training(self, messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """A finished dialogue (ending with the assistant) → (ids, mask); the mask is 1 on every answer and its EOS."""
    msgs = self._turns(messages)
    if msgs[-1]["role"] != "assistant": raise ValueError("a training dialogue must end with an assistant message")
    ids: list[int] = []
    mask: list[int] = []
    for user, answer in zip(msgs[0::2], msgs[1::2]):
      i, m = encode_split(f"[INST] {user['content'].strip()} [/INST]", f" {answer['content'].strip()} ", tokenizer, True, True)
      ids, mask = ids + i, mask + m
    return ids, mask

  @staticmethod
  def _turns(messages: list[dict]) -> list[dict]:
    """The messages with the system prompt folded into the first user turn, checked to alternate."""
    msgs = [dict(m) for m in _check_messages(messages)]
    if msgs[0]["role"] == "system":
      if len(msgs) < 2: raise ValueError("a system message must be followed by a user message")
      msgs = [{"role": msgs[1]["role"], "content": f"<<SYS>>\n{msgs[0]['content']}\n<</SYS>>\n\n{msgs[1]['content']}"}] + msgs[2:]
    for i, m in enumerate(msgs):
      want = "user" if i % 2 == 0 else "assistant"
      if m["role"] != want:
        raise ValueError(f"chat messages must alternate user/assistant (after an optional system message); "
                         f"message {i} is {m['role']!r}, expected {want!r}")
    return msgs


@dataclass(frozen=True)
class PlainTemplate:
  """For base models: the conversation's text joined by newlines, continued by the model."""
  def encode(self, messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("\n".join(m["content"] for m in _check_messages(messages)), bos=True)

  def encode_for_training(self, messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """All but the last message are the prompt; the last (the answer) and EOS are weighted."""
    msgs = _check_messages(messages)
    prompt = "\n".join(m["content"] for m in msgs[:-1])
    return encode_split(prompt + "\n" if prompt else "", msgs[-1]["content"], tokenizer, True, True)
