"""The browser chat page at / in a real headless Chromium (Debian's, driven by Playwright): load it, send
a message and see the streamed reply, stop a reply half-way, find the conversation again after a reload."""

import shutil
import time

import pytest
from serve_helpers import running_server, tiny_model

from lmforge.engine import Engine, EngineConfig
from lmforge.serve.server import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
# Playwright adds --headless and a fresh --user-data-dir itself; the rest keep Chromium off the closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tokenizer):
    model = tiny_model()
    model.embed.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # >= 20 ms a step: a reply to stop takes seconds
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, "tiny")) as url:
        yield url, engine


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page(viewport={"width": 1200, "height": 800})
        browser.close()


def last_reply(page):
    return page.locator('.msg[data-role="assistant"]').last


def test_chat_page_streams_stops_and_remembers(server, page, tmp_path):
    url, engine = server
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model option') && document.querySelector('#model').value === 'tiny'")
    assert not page.is_visible("#rag_row")  # no RAG database on this server
    page.fill("#max_tokens", "12")
    page.fill("#prompt", "Hello there")
    page.press("#prompt", "Enter")
    reply = last_reply(page)
    reply.wait_for(state="attached")
    page.wait_for_function("document.querySelectorAll('.msg[data-role=assistant]')[0].dataset.finish === 'length'", timeout=30_000)
    assert reply.locator(".body").inner_text().strip()  # the streamed text arrived
    assert "12 tokens" in reply.locator(".stats").inner_text()

    # a long reply: stop it once text is streaming; the server drops the request
    page.fill("#max_tokens", "400")
    page.fill("#prompt", "Tell me a long story")
    page.click("#send")
    page.wait_for_function("(document.querySelectorAll('.msg[data-role=assistant]')[1]?.querySelector('.body').innerText || '').length > 0",
                           timeout=30_000)  # fmt: skip
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_function("document.querySelectorAll('.msg[data-role=assistant]')[1].dataset.finish === 'stopped'", timeout=10_000)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    deadline = time.monotonic() + 10
    while engine.has_work() or engine.blocks.num_used:
        assert time.monotonic() < deadline, "the stopped request kept running on the server"
        time.sleep(0.05)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000

    # the conversation lives in the browser: a reload shows it again
    page.reload()
    page.wait_for_function("document.querySelectorAll('.msg').length === 4")
    assert page.locator('.msg[data-role="user"]').first.inner_text().endswith("Hello there")
    page.click("#new_chat")
    assert page.locator(".msg").count() == 0


def test_markdown_is_rendered_and_html_is_escaped(server, page):
    url, _ = server
    page.goto(url + "/")
    html = page.evaluate("renderMarkdown('# Title\\n**bold** and `code` <script>x</script>\\n- a\\n- b\\n```py\\nprint(1 < 2)\\n```')")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<li>a</li><li>b</li>" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert '<pre><code data-lang="py">print(1 &lt; 2)</code></pre>' in html


def test_rag_toggle_answers_from_documents(tokenizer, page, tmp_path):
    """With --rag-db, the page shows the toggle; a message sent with it on lists the retrieved sources."""
    from lmforge.rag.embed import Embedder
    from lmforge.rag.index import index_directory

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ships.md").write_text("# Ships\n\nThe lighthouse keeper painted the harbour boats blue every spring.\n")
    (docs / "bread.txt").write_text("Sourdough bread needs a starter, flour, water and salt.\n")
    index_directory(docs, tmp_path / "docs.db", Embedder.load(), progress=False)
    engine = Engine(tiny_model(), tokenizer, EngineConfig(kv_cache_gb=0.02, block_size=8))
    with running_server(create_app(engine, "tiny", rag=tmp_path / "docs.db")) as url:
        page.goto(url + "/")
        page.wait_for_selector("#rag_row", state="visible")
        page.check("#rag")
        page.fill("#max_tokens", "4")
        page.fill("#prompt", "What colour are the harbour boats?")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelector('.msg[data-role=assistant]')?.dataset.finish", timeout=30_000)
        sources = page.locator(".msg[data-role=assistant] .sources").inner_text()
        assert sources.startswith("Sources: [1] ") and "ships.md" in sources.split("[2]")[0]
