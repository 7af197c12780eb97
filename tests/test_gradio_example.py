"""examples/chat_gradio.py: the Gradio ChatInterface over the engine, launched for real and called with Gradio's own
client; its answers equal the library's."""
import importlib.util
import socket
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is an optional extra: pip install -e '.[gradio]'")
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with Gradio")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "chat_gradio.py"


def _example():
  spec = importlib.util.spec_from_file_location("chat_gradio", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def llm():
  from tinyllama2 import DEFAULT_MODEL, Llama
  from tinyllama2.tokenizer import PlainTemplate
  llm = Llama.from_pretrained(DEFAULT_MODEL, slots=2)
  llm.chat_template = PlainTemplate()
  return llm


def test_gradio_chat_streams_the_library_answer(llm):
  example = _example()
  demo = example.build_demo(llm, use_chat=False)
  port = _free_port()
  demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
  try:
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    answer = client.predict("Once upon a time", "", 0.0, 0.9, 40, api_name="/respond")
    assert answer == llm.generate("Once upon a time", max_new_tokens=40).text
    job = client.submit("The dog", "", 0.0, 0.9, 30, api_name="/respond")   # the conversation's second turn
    pieces = list(job)   # the growing answer as it streamed
    from tinyllama2.cli.chat import Conversation
    convo = Conversation(llm, None, False, "truncate-oldest", 30)
    convo.turns = [("Once upon a time", answer)]
    assert pieces and pieces[-1] == llm.generate(convo.prompt("The dog")[0], max_new_tokens=30).text
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
  finally:
    demo.close()


def test_history_and_system_make_the_cli_conversation(llm):
  from tinyllama2.cli.chat import Conversation
  respond = _example().responder(llm, use_chat=False)
  history = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": [{"type": "text", "text": " there was a dog."}]}]
  *_, answer = respond("Then", history, "Stories:", 0.0, 1.0, 20)
  convo = Conversation(llm, "Stories:", False, "truncate-oldest", 20)
  convo.turns = [("Once upon a time", " there was a dog.")]
  ids, _ = convo.prompt("Then")
  assert answer == llm.generate(ids, max_new_tokens=20).text
