"""Answering a question from retrieved chunks: the `stuff` chain (every chunk in one prompt) and the `refine`
chain (an answer from the first chunk, improved with each next one), as LangChain builds them, in the model's chat
template. The prompt must fit the model's context with room for the answer: chunks that do not fit are left out,
and a first chunk too long on its own is cut."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..tokenizer import PlainTemplate
from .retrieve import Hit

if TYPE_CHECKING: from ..llama import Llama

CHAINS = ("stuff", "refine")
_CJK = re.compile(r"[\u3400-\u9fff]")

PROMPTS = {   # (system, stuff, refine) in the question's language
  "en": ("You are a helpful assistant. Answer from the context given; if it does not hold the answer, say so.",
         "Context:\n{context}\n\nQuestion: {question}\nAnswer:",
         "Question: {question}\nAn answer so far: {answer}\n\nMore context:\n{context}\n\n"
         "Improve the answer with this context if it helps; otherwise repeat the answer so far.\nAnswer:"),
  "zh": ("你是一个乐于助人的助手。请根据给出的资料回答；资料中没有答案时，请如实说明。",
         "资料：\n{context}\n\n请根据以上资料回答问题。\n问题：{question}\n回答：",
         "问题：{question}\n目前的回答：{answer}\n\n更多资料：\n{context}\n\n如果这些资料有帮助，请改进回答；否则照原样给出目前的回答。\n回答："),
}


@dataclass
class Prompt:
  ids: list[int]
  text: str            # the user message, as put into the template
  hits: list[Hit]      # the chunks it holds, in order
  cut: bool = False    # the last chunk was cut to fit


@dataclass
class Answer:
  text: str
  sources: list[Hit]                      # the chunks the prompts held
  prompts: list[Prompt] = field(default_factory=list)


def language(question: str) -> str: return "zh" if _CJK.search(question) else "en"


def _context(hits: list[Hit], texts: list[str]) -> str:
  return "\n\n".join(f"[{h.chunk.id}]\n{t.strip()}" for h, t in zip(hits, texts))


def build_prompt(llm: Llama, question: str, hits: list[Hit], budget: int, answer: str | None = None) -> Prompt:
  """The longest prompt of the chunks in order that fits `budget` tokens: whole chunks while they fit, then the
  first chunk cut (by characters) if even it alone does not fit. answer: the refine chain's answer so far. The
  system message goes only to chat models (a chat template other than PlainTemplate)."""
  system, stuff, refine = PROMPTS[language(question)]
  with_system = not isinstance(llm.chat_template, PlainTemplate)   # a base model continues text: no instructions
  def encode(chosen: list[Hit], texts: list[str]) -> tuple[list[int], str]:
    body = (stuff if answer is None else refine).format(context=_context(chosen, texts), question=question.strip(),
                                                        answer=(answer or "").strip())
    msgs = [{"role": "system", "content": system}] * with_system + [{"role": "user", "content": body}]
    return llm.chat_template.encode(msgs, llm.tokenizer), body
  chosen: list[Hit] = []
  for h in hits:
    ids, body = encode(chosen + [h], [c.chunk.text for c in chosen + [h]])
    if len(ids) > budget: break
    chosen.append(h)
  if chosen or not hits:   # without hits: the bare question (build_prompt alone allows it)
    ids, body = encode(chosen, [c.chunk.text for c in chosen])
    if len(ids) > budget: raise ValueError(_too_long(len(ids), budget))
    return Prompt(ids, body, chosen)
  text, lo, hi = hits[0].chunk.text, 0, len(hits[0].chunk.text)   # the longest prefix of the first chunk that fits
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if len(encode(hits[:1], [text[:mid]])[0]) <= budget: lo = mid
    else: hi = mid - 1
  if lo == 0: raise ValueError(_too_long(len(encode(hits[:1], [""])[0]), budget))
  ids, body = encode(hits[:1], [text[:lo]])
  return Prompt(ids, body, hits[:1], cut=True)


def _too_long(n: int, budget: int) -> str:
  return (f"the question and instructions take {n} tokens, over the {budget} the context leaves beside the answer; "
          "shorten the question, lower --max-new-tokens or raise --max-seq-len")


def answer(llm: Llama, question: str, hits: list[Hit], chain: str = "stuff", **generation) -> Answer:
  """The model's answer to `question` from the retrieved `hits` (generation: GenerationConfig settings;
  max_new_tokens is kept free of the prompt)."""
  if chain not in CHAINS: raise ValueError(f"unknown chain {chain!r}; use one of {', '.join(CHAINS)}")
  if not question.strip(): raise ValueError("the question is empty")
  if not hits: raise ValueError("no chunk of the index matches the question (BM25 finds none of its words); "
                                "rephrase it or use the fused or dense retriever")
  max_new = generation.setdefault("max_new_tokens", 128)
  budget = llm.model.max_seq_len - max_new
  if budget <= 0:
    raise ValueError(f"--max-new-tokens {max_new} leaves no room for a prompt in the model's context "
                     f"of {llm.model.max_seq_len} tokens")
  if chain == "stuff":
    prompt = build_prompt(llm, question, hits, budget)
    return Answer(llm.generate(prompt.ids, **generation).text.strip(), prompt.hits, [prompt])
  text, prompts = None, []
  for h in hits:
    prompt = build_prompt(llm, question, [h], budget, answer=text)
    text = llm.generate(prompt.ids, **generation).text.strip()
    prompts.append(prompt)
  return Answer(text or "", [p.hits[0] for p in prompts if p.hits], prompts)
