"""One model, many users: threads and interleaved streams each get the tokens they would get alone, a chat turn
prefills only what is new, a conversation outgrowing the context goes on, Ctrl-C stops an answer."""
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tinyllama2 import DEFAULT_MODEL, Llama
from tinyllama2.cli.chat import Conversation, _CtrlC, chat_loop
from tinyllama2.tokenizer import Llama2ChatTemplate

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went", "One day, a little bird"]


@pytest.fixture(scope="module")
def llm() -> Llama:
  return Llama.from_pretrained(DEFAULT_MODEL)


def _alone(prompt: str, **kw) -> list[int]:
  """The tokens of a generation on a model of its own (nothing else ever used its cache)."""
  return Llama.from_pretrained(DEFAULT_MODEL).generate(prompt, **kw).tokens


def test_threads_calling_generate_get_the_tokens_of_sequential_calls(llm):
  sequential = [llm.generate(p, max_new_tokens=20).tokens for p in PROMPTS]
  results: dict[int, list[int]] = {}
  def run(i: int) -> None: results[i] = llm.generate(PROMPTS[i], max_new_tokens=20).tokens
  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
  for t in threads: t.start()
  for t in threads: t.join()
  assert [results[i] for i in range(len(PROMPTS))] == sequential


def test_interleaved_streams_each_continue_their_own_text(llm):
  a, b = llm.generate(PROMPTS[0], max_new_tokens=24, stream=True), llm.generate(PROMPTS[1], max_new_tokens=24, stream=True)
  ia, ib = iter(a), iter(b)
  done = {"a": False, "b": False}
  while not all(done.values()):   # one piece of each in turn
    for name, it in (("a", ia), ("b", ib)):
      if not done[name]: done[name] = next(it, None) is None
  assert a.generation.tokens == _alone(PROMPTS[0], max_new_tokens=24)
  assert b.generation.tokens == _alone(PROMPTS[1], max_new_tokens=24)


def test_a_request_in_the_middle_of_a_stream_leaves_both_as_they_are_alone(llm):
  stream = llm.generate(PROMPTS[2], max_new_tokens=30, stream=True, do_sample=True, seed=3, temperature=0.8)
  pieces = iter(stream)
  for _ in range(5): next(pieces)
  middle = llm.generate(PROMPTS[3], max_new_tokens=12, do_sample=True, seed=4, temperature=0.8)
  for _ in pieces: pass
  assert stream.generation.tokens == _alone(PROMPTS[2], max_new_tokens=30, do_sample=True, seed=3, temperature=0.8)
  assert middle.tokens == _alone(PROMPTS[3], max_new_tokens=12, do_sample=True, seed=4, temperature=0.8)


def test_a_second_chat_turn_prefills_only_the_new_tokens(llm):
  template, tok = Llama2ChatTemplate(), llm.tokenizer
  turn1 = [{"role": "user", "content": "Tell me a story about a cat."}]
  ids1 = template.encode(turn1, tok)
  g1 = llm.generate(ids1, max_new_tokens=16)
  turn2 = turn1 + [{"role": "assistant", "content": g1.text}, {"role": "user", "content": "And then?"}]
  ids2 = template.encode(turn2, tok)
  held, before = [list(h) for h in llm.decoder.held], llm.decoder.prefilled
  g2 = llm.generate(ids2, max_new_tokens=16)
  common = max(next((i for i, (x, y) in enumerate(zip(h, ids2)) if x != y), min(len(h), len(ids2))) for h in held)
  assert common >= len(ids1)                                    # the whole first turn is reused
  assert llm.decoder.prefilled - before == len(ids2) - common   # and only the rest is prefilled
  assert g2.tokens == Llama.from_pretrained(DEFAULT_MODEL).generate(ids2, max_new_tokens=16).tokens


def test_a_conversation_drops_its_oldest_turns_and_cuts_a_message_too_long_alone(llm, capsys):
  chat = Conversation(llm, "You tell stories.", use_chat=False, policy="truncate-oldest", answer_room=64)
  limit = llm.model.max_seq_len - 64
  for i in range(8): chat.answered(f"Turn {i}: the dog ran to the park and played with a red ball.", " It was fun.")
  ids, _ = chat.prompt("What happened next?")
  assert len(ids) <= limit and chat.dropped > 0 and chat.turns[-1][0].startswith("Turn 7")   # the latest turns stay
  assert llm.tokenizer.decode(ids).startswith("You tell stories.")                           # and the system prompt
  long = "word " * 2000
  ids, used = chat.prompt(long)
  assert len(ids) <= limit and chat.turns == [] and long.rstrip().endswith(used.strip()) and len(used) > 100   # its end
  assert "cut to its last" in capsys.readouterr().err
  strict = Conversation(llm, None, use_chat=False, policy="error", answer_room=64)
  with pytest.raises(ValueError, match="more than the .* that fit"): strict.prompt("word " * 2000)


def _chat(stdin: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "examples/chat.py", *args], input=stdin, capture_output=True, text=True,
                        cwd=ROOT, timeout=600)


def test_a_six_turn_piped_chat_on_the_bundled_model_finishes():
  lines = ["Once upon a time", "The dog", "Then", "A big tree", "She smiled", "The end came"]
  r = _chat("\n".join(lines) + "\n", "--seed", "1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("> ") == len(lines) + 1                   # every turn answered, then the prompt at EOF
  assert "dropped the oldest" in r.stderr and "Traceback" not in r.stderr


def test_a_message_longer_than_the_context_is_cut_or_refused_and_the_chat_goes_on():
  r = _chat("word " * 2000 + "\nThe dog\n", "--max-new-tokens", "8")
  assert r.returncode == 0 and "cut to its last" in r.stderr and r.stdout.count("> ") == 3, r.stderr[-2000:]
  r = _chat("word " * 2000 + "\nThe dog\n", "--max-new-tokens", "8", "--ctx-policy", "error")
  assert r.returncode == 0 and r.stdout.count("> ") == 3, r.stderr[-2000:]
  assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1
  r = _chat("", "--prompt", "word " * 2000, "--ctx-policy", "error")
  assert r.returncode == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(llm, monkeypatch, capsys):
  with _CtrlC() as ctrl_c:
    os.kill(os.getpid(), signal.SIGINT)
    assert ctrl_c.hit                                  # a first Ctrl-C only asks to stop
    with pytest.raises(KeyboardInterrupt): os.kill(os.getpid(), signal.SIGINT)
  generate = llm.generate
  def interrupted_after_three_pieces(*args, **kwargs):
    for i, piece in enumerate(generate(*args, **kwargs)):
      yield piece
      if i == 2: os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while the answer streams
  monkeypatch.setattr(llm, "generate", interrupted_after_three_pieces)
  lines, asked = iter(["Once upon a time", "The dog"]), []
  def fake_input(prompt: str) -> str:
    asked.append(prompt)
    try: return next(lines)
    except StopIteration: raise EOFError from None
  monkeypatch.setattr("builtins.input", fake_input)
  chat_loop(llm, None, "plain", None, {"max_new_tokens": 40}, str(DEFAULT_MODEL))
  assert capsys.readouterr().out.count(" [stopped]") == 2 and len(asked) == 3   # both answers stopped; on to EOF
