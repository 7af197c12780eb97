"""Invented facts planted in real text, and the questions that ask for them: a retrieval benchmark no one here
wrote the text of (the corpora are in ../shared), whose answers exist nowhere else."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EN = dict(syllables=["zor", "vath", "quel", "mir", "dax", "tul", "bren", "kos", "yav", "rin", "ulm", "pex", "oth", "wyl"],
          things=["brass telescopes", "copper kettles", "silver spoons", "glass lanterns", "wooden drums", "iron keys",
                  "clay jars", "linen maps"],
          places=["Harrowmere", "Quillstead", "Venmoor", "Ostrel Bay", "Drennick", "Calvessa"])
ZH = dict(surnames=["欧阳", "司马", "慕容", "上官", "诸葛", "东方", "独孤", "皇甫"],
          given=["瑾", "璇", "翊", "珩", "昱", "璟", "琰", "曦", "翎", "骁"],
          things=["梅花酒", "青瓷瓶", "古铜镜", "紫檀匣", "白玉簪", "鎏金炉"],
          places=["青石镇", "落霞湾", "白鹭洲", "云梦泽", "栖霞岭", "望川渡"])


@dataclass
class Fact:
  sentence: str
  question: str
  name: str
  number: str

  def found_in(self, text: str) -> bool: return self.name in text and self.number in text


def _fact(rng: np.random.Generator, lang: str) -> Fact:
  n = str(int(rng.integers(13, 990)))
  if lang == "en":
    s = lambda: "".join(rng.choice(EN["syllables"], 2))
    name, thing, place = f"{s().title()} {s().title()}", rng.choice(EN["things"]), rng.choice(EN["places"])
    return Fact(f"{name} of {place} keeps exactly {n} {thing}.", f"How many {thing} does {name} of {place} keep?",
                name, n)
  name = rng.choice(ZH["surnames"]) + "".join(rng.choice(ZH["given"], 2))
  thing, place = rng.choice(ZH["things"]), rng.choice(ZH["places"])
  return Fact(f"{name}在{place}藏了{n}件{thing}。", f"{name}在{place}藏了多少件{thing}？", name, n)


def plant(text: str, count: int, lang: str, seed: int = 0) -> tuple[str, list[Fact]]:
  """text with `count` facts (names that text does not hold) inserted at the starts of random lines."""
  rng = np.random.default_rng(seed)
  facts: list[Fact] = []
  while len(facts) < count:
    f = _fact(rng, lang)
    if f.name not in text and all(f.name != g.name for g in facts): facts.append(f)
  starts = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
  at = sorted(rng.choice(starts, count, replace=False).tolist())
  pieces, last = [], 0
  for pos, f in zip(at, facts):
    pieces += [text[last:pos], f.sentence + "\n"]
    last = pos
  return "".join(pieces) + text[last:], facts


def recall(ranked: list[list[str]], facts: list[Fact], k: int) -> float:
  """Share of facts with a chunk holding them among the first k of their ranking (chunk texts)."""
  return sum(any(f.found_in(t) for t in texts[:k]) for texts, f in zip(ranked, facts)) / len(facts)
