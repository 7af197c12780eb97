"""The chat page (tinyllama2/serve/static) in headless Chromium, driven by Playwright, against a real
`tinyllama2 serve` on the bundled model: streaming, Stop, Regenerate, Clear, text-only rendering, errors.

Screenshots go under each test's tmp_path; the main one is also copied to /tmp/tinyllama2_chat_page.png.
"""
import re
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAIN_SHOT = Path("/tmp/tinyllama2_chat_page.png")
PROMPT = "Once upon a time"
WIDE = {"width": 1280, "height": 800}

# Records the last answer's state, text length and buttons at every change of #messages (in the page, so that
# nothing is missed however fast the stream is); with stop=true it clicks #stop once the answer has some text.
RECORDER = """(stop) => {
  window.__log = [];
  window.__stopped = false;
  const messages = document.getElementById("messages");
  new MutationObserver(() => {
    const all = messages.querySelectorAll(".message.assistant");
    const a = all[all.length - 1];
    if (!a) return;
    const text = a.querySelector(".content").textContent;
    window.__log.push({state: a.dataset.state, length: text.length, send: document.getElementById("send").disabled,
                       stop: document.getElementById("stop").disabled});
    if (stop && !window.__stopped && a.dataset.state === "streaming" && text.length > 0) {
      window.__stopped = true;
      document.getElementById("stop").click();
    }
  }).observe(messages, {childList: true, subtree: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def browser():
  if not CHROMIUM.exists(): pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
  with sync_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
    yield b
    b.close()


def open_page(browser, server, **context):
  """A fresh browser context on the page, once it shows the model as ready; its uncaught errors are collected."""
  ctx = browser.new_context(**({"viewport": WIDE} | context))
  page = ctx.new_page()
  page.errors, page.dialogs = [], []
  page.on("pageerror", lambda e: page.errors.append(str(e)))
  page.on("console", lambda m: page.errors.append(m.text) if "Content Security Policy" in m.text else None)
  page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
  page.goto(server.url + "/")
  page.wait_for_selector("#status[data-state=ready]", timeout=15_000)
  return page


@pytest.fixture
def page(browser, bundled_server):
  page = open_page(browser, bundled_server)
  yield page
  errors, dialogs = page.errors, page.dialogs
  page.context.close()
  assert not errors and not dialogs, (errors, dialogs)


def settings(page, temperature=None, max_tokens=None):
  if temperature is not None: page.fill("#temperature", str(temperature))
  if max_tokens is not None: page.fill("#max-tokens", str(max_tokens))


def send(page, text: str) -> dict:
  """Types `text`, presses Enter; the JSON body the page posted."""
  page.fill("#input", text)
  with page.expect_request("**/v1/chat/completions") as request:
    page.press("#input", "Enter")
  return request.value.post_data_json


def wait_state(page, state: str, timeout: float = 60_000) -> None:
  page.wait_for_selector(f".message.assistant:last-child[data-state={state}]", timeout=timeout)


def answer_text(page) -> str:
  return page.locator(".message.assistant .content").last.text_content()


def server_answer(server, body: dict) -> dict:
  """The server's own non-streamed answer to what the page sent."""
  import httpx
  plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
  r = httpx.post(server.url + "/v1/chat/completions", json=plain, timeout=60)
  assert r.status_code == 200, r.text
  return r.json()


def slots_busy(server) -> int:
  import httpx
  return httpx.get(server.url + "/health", timeout=5).json()["slots_busy"]


def test_streamed_answer_regenerate_clear(page, bundled_server, tmp_path):
  settings(page, temperature=0, max_tokens=200)
  page.evaluate(RECORDER, False)
  body = send(page, PROMPT)
  assert body["messages"] == [{"role": "user", "content": PROMPT}]
  assert body["temperature"] == 0 and body["max_tokens"] == 200 and body["stream"] is True
  assert body["stream_options"] == {"include_usage": True} and body["model"] == "bundled"
  assert page.locator(".message.user .content").text_content() == PROMPT
  wait_state(page, "done")

  log = page.evaluate("window.__log")
  streaming = [e for e in log if e["state"] == "streaming"]
  assert any(e["length"] > 0 for e in streaming), log[:5]                       # text was there mid-stream
  assert len({e["length"] for e in streaming}) > 3                              # ... and it grew
  assert all(e["send"] and not e["stop"] for e in streaming)                    # Send off, Stop on while streaming
  lengths = [e["length"] for e in log]
  assert lengths == sorted(lengths)

  want = server_answer(bundled_server, body)
  text = answer_text(page)
  assert text == want["choices"][0]["message"]["content"] and text
  usage = want["usage"]
  stats = page.locator(".message.assistant .stats").text_content()
  assert re.search(r"\d[\d,.]* tok/s", stats), stats
  assert f"prompt {usage['prompt_tokens']}" in stats and f"completion {usage['completion_tokens']} tokens" in stats
  assert page.is_enabled("#send") and page.is_disabled("#stop") and page.is_enabled("#regenerate")
  page.screenshot(path=tmp_path / "chat_answer.png", animations="disabled")
  shutil.copy(tmp_path / "chat_answer.png", MAIN_SHOT)

  # Regenerate: the same conversation without the last answer; a new answer replaces the old (greedy: equal)
  page.eval_on_selector(".message.assistant", "a => { a.__old = true; }")
  with page.expect_request("**/v1/chat/completions") as again:
    page.click("#regenerate")
  assert again.value.post_data_json == body
  page.wait_for_function("""() => { const a = document.querySelectorAll('.message.assistant');
    return a.length === 1 && !a[0].__old && a[0].dataset.state === 'done'; }""", timeout=60_000)
  assert page.locator(".message.user").count() == 1 and answer_text(page) == text

  page.click("#clear")
  assert page.eval_on_selector("#messages", "m => m.childElementCount") == 0
  assert page.is_disabled("#regenerate") and page.is_enabled("#send")


def test_stop_mid_answer(page, bundled_server, tmp_path):
  settings(page, temperature=0, max_tokens=256)
  page.evaluate(RECORDER, True)   # clicks #stop as soon as the answer has some text
  body = send(page, PROMPT)
  wait_state(page, "stopped", timeout=30_000)
  partial = answer_text(page)
  assert page.is_enabled("#send") and page.is_disabled("#stop")
  assert "stopped" in page.locator(".message.assistant .stats").text_content()
  deadline = time.time() + 5
  while (busy := slots_busy(bundled_server)) and time.time() < deadline: time.sleep(0.1)
  assert busy == 0, "the server still holds a slot for the stopped request"
  full = server_answer(bundled_server, body)["choices"][0]["message"]["content"]
  assert partial and full.startswith(partial) and len(partial) < len(full)
  page.screenshot(path=tmp_path / "chat_stopped.png", animations="disabled")

  # the stopped answer is replaced by a whole one
  page.click("#regenerate")
  wait_state(page, "done")
  assert page.locator(".message.assistant").count() == 1 and answer_text(page) == full


def test_html_is_text_and_shift_enter(page, tmp_path):
  settings(page, temperature=0, max_tokens=24)
  page.click("#input")
  page.keyboard.type("<b>x</b>")
  page.keyboard.press("Shift+Enter")                   # a new line, not a send
  page.keyboard.type("<img src=x onerror=alert(1)>")
  assert page.input_value("#input") == "<b>x</b>\n<img src=x onerror=alert(1)>"
  assert page.locator(".message").count() == 0
  with page.expect_request("**/v1/chat/completions"):
    page.keyboard.press("Enter")
  page.wait_for_selector(".message.assistant:not([data-state=streaming])", timeout=60_000)
  assert page.locator(".message.user .content").text_content() == "<b>x</b>\n<img src=x onerror=alert(1)>"
  assert page.locator("#messages b, #messages img, #messages script").count() == 0
  assert page.input_value("#input") == ""
  page.screenshot(path=tmp_path / "chat_html.png", animations="disabled")


def test_errors_clamp_and_api_key(page, bundled_server, tmp_path):
  page.fill("#max-tokens", "100000")
  page.press("#max-tokens", "Tab")                     # change: clamped to the model's context
  assert page.input_value("#max-tokens") == "256"
  send(page, "hello " * 300)                           # over the 256-token context: a 400 from the server
  wait_state(page, "error", timeout=30_000)
  error = page.locator(".message.assistant .error").text_content()
  assert "context" in error and "256" in error, error
  assert page.is_enabled("#send") and page.is_disabled("#stop")
  page.screenshot(path=tmp_path / "chat_error.png", animations="disabled")

  page.fill("#api-key", "sk-test")
  page.press("#api-key", "Tab")
  with page.expect_request("**/v1/models") as models:
    page.reload()
  assert models.value.headers.get("authorization") == "Bearer sk-test"
  assert page.input_value("#api-key") == "sk-test"     # kept in localStorage
  page.wait_for_selector("#status[data-state=ready]")


def test_dark_and_narrow(browser, bundled_server, tmp_path):
  for name, context in (("dark", {"color_scheme": "dark"}),
                        ("narrow", {"viewport": {"width": 420, "height": 820}, "color_scheme": "light"})):
    page = open_page(browser, bundled_server, **context)
    if name == "narrow":
      assert not page.is_visible("#sidebar") or page.locator("#sidebar").bounding_box()["x"] < 0
      page.click("#toggle-settings")
      page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
      page.wait_for_timeout(300)   # the drawer's slide-in
      page.screenshot(path=tmp_path / "chat_narrow_settings.png", animations="disabled")
      page.fill("#temperature", "0")
      page.fill("#max-tokens", "60")
      page.click("#backdrop", position={"x": 400, "y": 400})
    else:
      settings(page, temperature=0, max_tokens=60)
    send(page, PROMPT)
    wait_state(page, "done")
    page.screenshot(path=tmp_path / f"chat_{name}.png", animations="disabled")
    assert not page.errors and not page.dialogs, (page.errors, page.dialogs)
    page.context.close()
