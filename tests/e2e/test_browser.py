"""The chat page in Debian's chromium driven by Playwright: pick a character, attach an image, see a streamed reply."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from personae.data.cards import load_card
from personae.serve.server import ServerThread
from tests.e2e.helpers import CHARACTER, data_url, png_bytes

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

from playwright import sync_api  # noqa: E402  (a dev dependency: its absence is an error, not a skip)


@pytest.fixture(autouse=True)
def _chromium_installed() -> None:
    if CHROMIUM is None:  # a missing browser fails loudly: .ci/run installs it
        pytest.fail("the browser test needs Debian's chromium: apt-get install chromium")


@pytest.fixture()
def page_server(make_app: Callable[..., FastAPI], run_copy: Path) -> Iterator[ServerThread]:
    """A live server on a private copy of the run (the test uploads a card)."""
    server = ServerThread(make_app(run=run_copy))
    server.start()
    yield server
    server.stop()


def test_phone_user_uploads_a_card_picks_a_character_attaches_an_image_and_gets_a_streamed_reply(
        page_server: ServerThread, tmp_path: Path) -> None:
    image, card = tmp_path / "scene.png", tmp_path / "nova.json"
    image.write_bytes(png_bytes((240, 200, 40), (120, 90)))
    card.write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": "Nova Vale", "first_mes": "Hi!"}}))
    ARTIFACTS.mkdir(exist_ok=True)
    scheduler = page_server.app.state.context.scheduler
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 780}, device_scale_factor=1)
            page.goto(page_server.url + "/")
            page.click("#toggle-characters")  # on a phone the characters are in a drawer
            page.set_input_files("#card-input", str(card))
            page.wait_for_selector('.character.selected[data-id="nova-vale"]')
            page.click(f'.character[data-id="{CHARACTER}"]')
            expected = load_card(page_server.app.state.context.run_dir / "characters" / f"{CHARACTER}.json").name
            assert page.text_content("#current-name") == expected
            page.set_input_files("#image-input", str(image))
            page.wait_for_selector("#attachment:not([hidden])")
            page.fill("#message", "What do you see in this picture?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state='done'] .regenerate", timeout=20_000)
            text = page.locator(".msg.assistant").last.locator(".text").text_content()
            page.screenshot(path=str(ARTIFACTS / "chat_phone.png"), full_page=True)
            assert text and text.strip()
            assert page.locator(".msg.user img").count() == 1  # the image went with the message
            assert page.locator("#attachment").is_hidden()  # and left the composer
        finally:
            browser.close()
    assert scheduler.stats.requests == 1 and (page_server.app.state.context.run_dir / "uploads/nova-vale.json").exists()
    assert (ARTIFACTS / "chat_phone.png").stat().st_size > 1000


def test_a_long_illustrated_chat_goes_on_past_64_messages_and_5_images(page_server: ServerThread) -> None:
    url = data_url(png_bytes((30, 160, 90)))
    bodies: list[dict] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: bodies.append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions") else None)
            page.goto(page_server.url + "/")
            page.click(f'.character[data-id="{CHARACTER}"]')
            # 80 earlier messages, 8 of them with an image: a chat the server used to refuse
            page.evaluate("""(url) => { for (let i = 0; i < 80; i++) state.messages.push({
                role: i % 2 ? "assistant" : "user", text: "line " + i, image: i % 2 || i % 10 ? null : url}); }""", url)
            page.fill("#message", "And now?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state='done'] .regenerate", timeout=20_000)
            assert page.locator(".msg[data-state='error']").count() == 0
            assert page.locator(".msg.assistant").last.locator(".text").text_content().strip()
        finally:
            browser.close()
    sent = bodies[-1]["messages"]
    assert len(sent) > 64
    images = [part for m in sent if isinstance(m["content"], list) for part in m["content"]
              if part["type"] == "image_url"]
    assert len(images) == 1  # only the latest image travels: the model looks at one
