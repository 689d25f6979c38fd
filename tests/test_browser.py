"""The web explorer in a real headless Chromium (Debian /usr/bin/chromium driven by playwright).

Plants an item with a unique label, uploads the same image in the page, sees it as the nearest neighbour,
clicks "forget" and sees the prediction change. Saves a screenshot under the test's tmp folder.
"""
from __future__ import annotations

import os

import pytest

from test_serve import AUTH, TOKEN, png, served  # noqa: F401  (served: the module-scoped Serve app fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.slow
def test_explorer_upload_forget_reclassify(served, tmp_path):  # noqa: F811
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: apt-get install -y chromium")
    from playwright.sync_api import expect, sync_playwright

    client, cfg, data = served
    raw = png(data["test_images"][2])
    r = client.post("/v1/items", files={"image": ("plant.png", raw, "image/png")},
                    data={"label": "42", "label_name": "planted"}, headers=AUTH)
    assert r.status_code == 201, r.text
    planted = r.json()["id"]
    query = tmp_path / "query.png"
    query.write_bytes(raw)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(str(client.base_url) + "/")
            expect(page.locator("#stats")).to_contain_text("items")
            page.fill("#k", "10")
            page.fill("#token", TOKEN)
            page.set_input_files("#file", str(query))
            cards = page.locator(".nb")
            expect(cards).to_have_count(10)
            assert cards.first.get_attribute("data-id") == str(planted)  # distance 0: the nearest
            expect(page.locator(".bar").first).to_be_visible()
            page.wait_for_function("() => [...document.querySelectorAll('.nb img')].every(i => i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "before.png"), full_page=True)
            # k=1: the planted item alone decides, so forgetting it must change the prediction.
            page.fill("#k", "1")
            page.click("#classify")
            expect(cards).to_have_count(1)
            expect(page.locator("#label")).to_have_text("planted")
            first = cards.first
            assert first.get_attribute("data-id") == str(planted)
            first.locator("button.forget").click()
            expect(page.locator("#message")).to_contain_text(f"forgot item {planted}")
            expect(page.locator("#label")).not_to_have_text("planted")
            expect(page.locator(f'.nb[data-id="{planted}"]')).to_have_count(0)
            page.wait_for_function("() => [...document.querySelectorAll('.nb img')].every(i => i.naturalWidth > 0)")
            shot = tmp_path / "after.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshots: {tmp_path}/before.png {shot}")
        finally:
            browser.close()
    assert client.get(f"/v1/items/{planted}").status_code == 404
