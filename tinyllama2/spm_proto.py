"""Just enough of protobuf's wire format to read and write SentencePiece's ModelProto without the protobuf package.

ModelProto: repeated SentencePiece pieces = 1 {string piece = 1; float score = 2; Type type = 3}, TrainerSpec = 2,
NormalizerSpec = 3, ... (sentencepiece_model.proto). Fields we don't touch are kept as raw bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n: return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes: return varint(number << 3 | wire) + payload
def int_field(number: int, value: int) -> bytes: return field(number, 0, varint(value))
def bytes_field(number: int, value: bytes) -> bytes: return field(number, 2, varint(len(value)) + value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(buf): raise ValueError("truncated varint")
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if not b & 0x80: return value, pos
    shift += 7


def fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
  """[(field number, wire type, value)] of one message: ints for varint, bytes for the rest; raw order kept."""
  out, pos = [], 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    num, wire = key >> 3, key & 7
    if wire == 0: val, pos = _read_varint(buf, pos)
    elif wire == 1: val, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5: val, pos = buf[pos:pos + 4], pos + 4
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      val, pos = buf[pos:pos + n], pos + n
    else: raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos > len(buf): raise ValueError("truncated protobuf message")
    out.append((num, wire, val))
  return out


def encode_field(num: int, wire: int, val: bytes | int) -> bytes:
  if wire == 0: return int_field(num, int(val))
  if wire == 2: return bytes_field(num, bytes(val))
  return field(num, wire, bytes(val))


@dataclass
class Piece:
  piece: str
  score: float = 0.0
  type: int = NORMAL

  def encode(self) -> bytes:
    return bytes_field(1, bytes_field(1, self.piece.encode()) + field(2, 5, struct.pack("<f", self.score)) +
                       int_field(3, self.type))


def parse_model(buf: bytes) -> tuple[list[Piece], list[tuple[int, int, bytes | int]]]:
  """(pieces, every other top-level field as raw (number, wire, value))."""
  pieces, rest = [], []
  for num, wire, val in fields(buf):
    if num == 1 and wire == 2:
      p = Piece("")
      for n, w, v in fields(val):
        if n == 1: p.piece = bytes(v).decode("utf-8")
        elif n == 2 and w == 5: p.score = struct.unpack("<f", v)[0]
        elif n == 3: p.type = int(v)
      pieces.append(p)
    else: rest.append((num, wire, val))
  return pieces, rest


def serialize_model(pieces: list[Piece], rest: list[tuple[int, int, bytes | int]]) -> bytes:
  return b"".join(p.encode() for p in pieces) + b"".join(encode_field(*f) for f in rest)
