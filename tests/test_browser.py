"""`genperc serve` in a real browser (issue 13): Debian's Chromium driven by Playwright loads the
page, picks a held-out scene, predicts while the denoising streams, corrects by typing D⁻ and by
clicking the wrongly chosen object (ADDP §3.3, Fig. 1c), runs the agent and uploads bad files —
and every request the page makes stays on this machine.

``playwright install`` cannot download here: the test launches $GENPERC_CHROMIUM (default
/usr/bin/chromium, what ``make test`` installs) and fails, saying so, when it is missing."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from genperc.data.toy import ToyShapes
from genperc.interactive.session import CorrectionSession
from genperc.interactive.web import display_factor

CHROMIUM = os.environ.get("GENPERC_CHROMIUM", "/usr/bin/chromium")
# The flags that work on this closed network (REFERENCE.md): no sandbox, no GPU, nothing fetched.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
LOCAL = {"127.0.0.1", "localhost"}
TIMEOUT_MS = 20_000

# Every value the step label takes, recorded in the page as it changes (a stream can be faster
# than a test that polls).
RECORD_STEPS = """() => {
  window.__steps = [];
  const node = document.querySelector('#step [data-testid=markdown]');
  new MutationObserver(() => window.__steps.push(node.innerText.trim()))
    .observe(node, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (`make browser`, or apt-get install chromium) or "
                    "point GENPERC_CHROMIUM at one — the browser test needs it", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def served(served_page):
    return served_page


def object_click(page, scene, object_id: int) -> tuple[float, float]:
    """Where to click on the page's image to hit ``object_id``: its pixel nearest to its centroid,
    through the display enlargement and the browser's scaling of the <img> (as Gradio maps back)."""
    ys, xs = np.nonzero(scene.instances == object_id)
    i = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    k = display_factor(scene.image)
    img = page.locator("#view img")
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    natural_w, natural_h = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
    r = min(box["width"] / natural_w, box["height"] / natural_h, 1)
    left = box["x"] + (box["width"] - natural_w * r) / 2
    top = box["y"] + (box["height"] - natural_h * r) / 2
    return left + (xs[i] + 0.5) * k * r, top + (ys[i] + 0.5) * k * r


def test_the_page_in_a_real_browser(browser, served, tmp_path):
    from playwright.sync_api import expect

    run, url = served
    scene = ToyShapes(size=6, resolution=16, split="test")[0]
    texts = [e.text for e in scene.expressions]
    requests: list[str] = []
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("request", lambda request: requests.append(request.url))
    message = page.locator("#message [data-testid=markdown]")  # not its progress timer

    page.goto(url)
    page.locator("#scenes .thumbnail-item").first.click()  # load: pick a held-out scene
    expect(message).to_contain_text("scene 0 (16x16)")
    page.locator("#expressions input").click()  # the scene's own expressions, offered
    page.get_by_role("option", name=texts[0], exact=True).click()
    expect(page.locator("#expression textarea")).to_have_value(texts[0])

    page.evaluate(RECORD_STEPS)  # predict: the denoising streams, step by step
    page.locator("#predict").click()
    expect(message).to_contain_text(f"round 1 (predict): “{texts[0]}”")
    steps = [s for s in dict.fromkeys(page.evaluate("window.__steps")) if s.startswith("step ")]
    assert len(steps) >= 2, f"the step label changed {len(steps)} time(s) while predicting: {steps}"

    page.locator("#negatives textarea").fill(texts[1])  # a typed correction
    page.locator("#correct").click()
    expect(message).to_contain_text(f"round 2 (correct): “{texts[0]}”, D⁻ = “{texts[1]}”")

    wrong = scene.objects[-1].id  # a click correction: the object's description fills D⁻
    page.locator("#negatives textarea").fill("")
    x, y = object_click(page, scene, wrong)
    page.mouse.click(x, y)
    described = CorrectionSession(run, scene.image, scene=scene).describe_click(
        *np.argwhere(scene.instances == wrong)[0][::-1])
    expect(page.locator("#negatives textarea")).to_have_value(described)
    page.locator("#correct").click()
    expect(message).to_contain_text(f"round 3 (correct): “{texts[0]}”, D⁻ = “{described}”")
    expect(page.locator("#rounds")).to_contain_text("round 3 (correct)")

    (tmp_path / "notes.txt").write_text("not an image")  # bad uploads: one line, no traceback
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(tmp_path / "depth.png")
    for name, needle in [("notes.txt", "cannot read notes.txt as an image"), ("depth.png", "depth.png is a I;16")]:
        page.locator("#upload input[type=file]").set_input_files(str(tmp_path / name))
        expect(message).to_contain_text(needle)
        assert len(message.inner_text().strip().splitlines()) == 1
        assert "Traceback" not in page.content()
    page.locator("#agent").click()  # the agent, with its reasoning
    expect(page.locator("#agent-reasoning")).to_contain_text("Confusers")
    expect(message).to_contain_text("round 4 (agent)")

    page.close()

    outside = [u for u in requests if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname not in LOCAL]
    assert requests and not outside, f"the page fetched from outside this machine: {outside[:5]}"
