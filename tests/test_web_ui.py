"""The chat page every server serves at /, driven in a real browser: Debian's headless
Chromium through selenium (no browser is downloaded; without chromium, chromium-driver
and selenium the browser test is skipped, saying what to install).

One server in front of two engines: the demo model (models/demo-model, which writes
English) and a tiny random checkpoint that rambles on greedily (a long reply to stop).
The page loads, lists both models, streams a reply that grows in several steps and shows
its timings and token counts; a long reply is stopped mid-stream and the engine's KV
usage returns to where it was; markup typed into the chat is shown, not run; the engine
killed shows an error in the conversation, and once it is restarted the page gets a
reply again; a server with an API key makes the page ask for it; the page fits a phone's
width. Without a browser: the page's headers (Content-Security-Policy), its files, and
`--no-web-ui`.

SPLITINFER_SAVE_SCREENSHOT=1 also writes the screenshot README shows (docs/chat-page.png).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import REPO, free_port, start_engine, start_server, stop

from splitinfer.server.web_ui import CONTENT_SECURITY_POLICY

DEMO_MODEL = REPO / "models" / "demo-model"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
BROWSER_MISSING = (
    "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) "
    "and selenium (pip install selenium; it is in the test extra)"
)
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM), reason=BROWSER_MISSING)
WORDS = re.compile(r"[a-z]+(?:'[a-z]+)?")


def test_the_page_and_its_files_carry_a_strict_content_security_policy(tiny_checkpoint: Path, tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/engine.sock"
    engine = start_engine(tiny_checkpoint, address, tmp_path / "engine.log")
    port, quiet_port = free_port(), free_port()
    server = start_server(address, port, tmp_path / "server.log", "--api-key", "sekrit")
    quiet = start_server(address, quiet_port, tmp_path / "quiet.log", "--no-web-ui")
    try:
        base = f"http://127.0.0.1:{port}"
        page = httpx.get(f"{base}/")
        assert page.status_code == 200, "the page needs no key: it asks for one"
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        # Nothing inline (the policy would block it) and nothing from another host.
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "style=" not in html and "<style" not in html
        assert not re.search(r"(src|href)=\"(https?:)?//", html)
        for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
            response = httpx.get(base + path)
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert "http://" not in response.text and "https://" not in response.text
        assert httpx.head(f"{base}/").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401, "the API still wants its key"
        assert httpx.get(f"http://127.0.0.1:{quiet_port}/").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{quiet_port}/v1/models").status_code == 200
    finally:
        stop(quiet)
        stop(server)
        stop(engine)


def test_the_demo_model_answers_the_openai_sdk_in_english(tmp_path: Path) -> None:
    """What the quick start serves, through a real server and the openai SDK."""
    import openai

    address = f"ipc://{tmp_path}/engine.sock"
    engine = start_engine(DEMO_MODEL, address, tmp_path / "engine.log")
    port = free_port()
    server = start_server(address, port, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        [model] = [m.id for m in client.models.list().data]
        assert model == "demo-model"
        for i, question in enumerate(("Hello!", "What is the meaning of life?", "Tell me a joke.")):
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=48,
                temperature=0.7,
                seed=i,
            )
            text = reply.choices[0].message.content
            assert mostly_english(text, vocabulary()), f"{question!r} -> {text!r}"
    finally:
        stop(server)
        stop(engine)


# The browser ---------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout_s: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def options(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")


def set_field(driver, element_id: str, value: str) -> None:
    """As a user types into a field (the change event included)."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # Record the length of the reply's text at every change of the page, to see it grow.
    driver.execute_script(
        """
        window.lengths = [];
        window.observer && window.observer.disconnect();
        window.observer = new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant .content');
            if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
        });
        window.observer.observe(document.getElementById('conversation'),
                                {subtree: true, childList: true, characterData: true});
        """
    )
    box = driver.find_element(By.ID, "input")
    for i, line in enumerate(text.split("\n")):
        if i:
            box.send_keys(Keys.SHIFT, Keys.ENTER)  # a new line, as the page says; Enter alone sends
        box.send_keys(line)
    box.send_keys(Keys.ENTER)


def last(driver, selector: str) -> dict | None:
    return driver.execute_script(
        """const all = document.querySelectorAll(arguments[0]);
           if (!all.length) return null;
           const m = all[all.length - 1];
           return {state: m.dataset.state || null, text: m.querySelector('.content').textContent,
                   meta: m.querySelector('.meta').textContent, count: all.length};""",
        selector,
    )


def finished_reply(driver, count: int, timeout_s: float = 60.0) -> dict:
    """The `count`-th assistant message once it is no longer streaming."""

    def done() -> dict | None:
        reply = last(driver, ".message.assistant")
        return reply if reply and reply["count"] >= count and reply["state"] != "streaming" else None

    return wait_for(done, timeout_s, "the reply to finish")


def kv_usage(port: int, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    match = re.search(rf'splitinfer_engine_kv_cache_usage{{[^}}]*model="{model}"[^}}]*}} ([0-9.e+-]+)', text)
    assert match, text[-2000:]
    return float(match.group(1))


def vocabulary() -> set[str]:
    return set((DEMO_MODEL / "vocabulary.txt").read_text().split())


def mostly_english(text: str, known: set[str]) -> bool:
    words = WORDS.findall(text.lower())
    return len(words) >= 3 and sum(word in known for word in words) >= 0.7 * len(words)


@needs_browser
def test_the_chat_page_in_a_real_browser(tiny_checkpoint: Path, tmp_path: Path, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    demo_address = f"ipc://{tmp_path}/demo.sock"
    rambler_address = f"ipc://{tmp_path}/rambler.sock"
    port = free_port()
    engines: dict[str, object] = {}
    server = None
    locked = None
    try:
        demo_log = tmp_path / "demo.log"
        engines["demo"] = start_engine(DEMO_MODEL, demo_address, demo_log, "--served-model-name", "demo")
        engines["rambler"] = start_engine(
            tiny_checkpoint, rambler_address, tmp_path / "rambler.log", "--served-model-name", "rambler"
        )
        server = start_server(demo_address, port, tmp_path / "server.log", "--engine", rambler_address)
        ready_s = float(re.search(r"engine ready in ([\d.]+) s", demo_log.read_text()).group(1))
        assert ready_s < 1.0, f"the demo model took {ready_s} s to load (README promises under a second)"
        url = f"http://127.0.0.1:{port}/"
        browser.get(url)
        assert wait_for(lambda: sorted(options(browser)) == ["demo", "rambler"], what="the model list")
        Select(browser.find_element(By.ID, "model")).select_by_value("demo")

        # A reply streams in: it grows in several steps, then shows its numbers.
        send(browser, "Hello! Tell me something wise.")
        reply = finished_reply(browser, 1)
        assert reply["state"] == "done", reply
        growth = sorted(set(browser.execute_script("return window.lengths")) - {0})
        assert len(growth) >= 3, f"the reply grew in {len(growth)} step(s): {growth}"
        assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · \d+ prompt \+ \d+ completion tokens", reply["meta"])
        assert mostly_english(reply["text"], vocabulary()), reply["text"]
        user = last(browser, ".message.user")
        assert user["text"] == "Hello! Tell me something wise."

        send(browser, "Say something funny.")
        assert mostly_english(finished_reply(browser, 2)["text"], vocabulary())
        shot = tmp_path / "chat-page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("SPLITINFER_SAVE_SCREENSHOT") == "1":
            shutil.copyfile(shot, REPO / "docs" / "chat-page.png")

        # Markup in the conversation is shown as text and never runs; code blocks stay blocks.
        send(
            browser,
            '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> Give me a quote.\n'
            "```python\nprint('<b>hi</b>')\n```",
        )
        finished_reply(browser, 3)
        assert browser.execute_script("return window.pwned") is None
        assert last(browser, ".message.user")["text"].startswith("<img src=x onerror=")
        assert not browser.find_elements(By.CSS_SELECTOR, "#conversation img, #conversation script, #conversation b")
        [code] = browser.find_elements(By.CSS_SELECTOR, ".message.user pre code")
        assert code.text == "print('<b>hi</b>')"

        # Edit the last message and resend it: the old exchange goes, the new one comes.
        browser.find_element(By.ID, "edit").click()
        assert browser.find_element(By.ID, "input").get_attribute("value").startswith("<img src=x")
        assert last(browser, ".message.user")["text"] == "Say something funny."
        browser.find_element(By.ID, "input").clear()
        send(browser, "Give me a quote.")
        assert finished_reply(browser, 3)["state"] == "done"
        assert last(browser, ".message.user")["text"] == "Give me a quote."

        # A request the server refuses (a prompt past the model's 1024-token context): a 400,
        # shown in the conversation.
        browser.find_element(By.ID, "settings-toggle").click()
        system = browser.find_element(By.ID, "system")  # pasted: typing 9000 characters takes long
        browser.execute_script("arguments[0].value = arguments[1]", system, "Remember this. " * 600)
        send(browser, "Hello?")
        refused = wait_for(lambda: last(browser, ".message.error"), 30, "the refusal in the conversation")
        assert refused["text"].startswith("400:") and "context_length_exceeded" in refused["text"], refused
        set_field(browser, "system", "")
        browser.find_element(By.ID, "settings-toggle").click()

        # A long reply, stopped mid-stream: the request ends in the engine, its KV blocks freed.
        browser.find_element(By.ID, "clear").click()
        Select(browser.find_element(By.ID, "model")).select_by_value("rambler")
        browser.find_element(By.ID, "settings-toggle").click()
        set_field(browser, "temperature", "0")
        set_field(browser, "max-tokens", "1500")
        baseline = kv_usage(port, "rambler")
        send(browser, "Tell me a long story.")
        wait_for(lambda: (last(browser, ".message.assistant") or {}).get("text"), what="the first tokens")
        wait_for(lambda: kv_usage(port, "rambler") > baseline, 10, "the KV usage to rise")
        browser.find_element(By.ID, "stop").click()
        stopped = finished_reply(browser, 1, timeout_s=10)
        assert stopped["state"] == "stopped" and "stopped" in stopped["meta"], stopped
        assert len(stopped["text"]) > 0
        wait_for(lambda: kv_usage(port, "rambler") == baseline, 15, "the KV usage to return to its baseline")

        # The engine killed: the conversation says so; restarted, the page gets replies again.
        browser.find_element(By.ID, "clear").click()
        set_field(browser, "max-tokens", "24")
        engines["rambler"].send_signal(signal.SIGKILL)
        engines["rambler"].wait(10)
        send(browser, "Are you there?")
        error = wait_for(lambda: last(browser, ".message.error"), 30, "an error in the conversation")
        assert "engine" in error["text"] and ("unavailable" in error["text"] or "503" in error["text"]), error
        engines["rambler"] = start_engine(
            tiny_checkpoint, rambler_address, tmp_path / "rambler-again.log", "--served-model-name", "rambler"
        )
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, 30, "the engine back")
        wait_for(lambda: "rambler" in httpx.get(f"http://127.0.0.1:{port}/health").json()["models"], 30)
        send(browser, "And now?")
        again = finished_reply(browser, 1)
        assert again["state"] == "done" and again["text"], again

        # A phone's width: nothing wider than the screen.
        browser.set_window_size(390, 844)
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone"
        browser.save_screenshot(str(tmp_path / "chat-page-phone.png"))

        # A server that wants a key: the page asks for it, and then lists the models.
        locked_port = free_port()
        locked = start_server(demo_address, locked_port, tmp_path / "locked.log", "--api-key", "sekrit")
        browser.set_window_size(1000, 900)
        browser.get(f"http://127.0.0.1:{locked_port}/")
        wait_for(lambda: "requires an API key" in browser.find_element(By.ID, "status").text, what="the key prompt")
        assert browser.find_element(By.ID, "api-key").is_displayed()
        set_field(browser, "api-key", "sekrit")
        assert wait_for(lambda: options(browser) == ["demo"], what="the models after the key")
        assert browser.execute_script("return localStorage.getItem('splitinfer.apiKey')") == "sekrit"
    finally:
        for proc in (locked, server, *engines.values()):
            if proc is not None:
                stop(proc)
