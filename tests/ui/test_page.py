"""The page at /ui in a real headless Chromium against a real uvicorn process: enroll real CUHK03 crops through
it, find a person by another shot, see the attention masks as decoded pixels, delete, and the API key asked for.
Nothing the page asks for leaves the service's origin, and its Content-Security-Policy allows no inline script."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models import build_eval_transform, load_weights
from tests.app.server import Server
from tests.conftest import SHARED_DATA, require_shared
from tests.ui.conftest import ARTIFACTS

pytestmark = [pytest.mark.shared, pytest.mark.slow]

# Four CUHK03 val people, each enrolled with a camera-A and a camera-B shot; the query is another camera-A shot
# (01) of the second one, a near-duplicate of its enrolled shot 00.
PEOPLE = [12, 13, 14, 15]
QUERY_PID = 13
KEY = "ui-test-key-4b9d"
VIEWS = ["crop", "mask", "overlay", "hidden"]
TIMEOUT_MS = 60_000  # a busy 2-core machine; a step that passes waits only as long as it needs


def _crop(pid: int, shot: str) -> Path:
    return require_shared(SHARED_DATA / "cuhk03-detected" / "val") / f"{pid:04d}_{shot}.jpg"


def _identity(pid: int) -> str:
    return f"cuhk03-{pid:04d}"


class Watcher:
    """Every request the page makes, its answers over 399, every console error and uncaught exception."""

    def __init__(self, page: Any) -> None:
        self.requests: list[Any] = []
        self.failed: list[tuple[str, str, int]] = []
        self.errors: list[str] = []
        page.on("request", self._request)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", self._page_error)

    def _request(self, request: Any) -> None:
        self.requests.append(request)

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed.append((response.request.method, response.url.split("?")[0], response.status))

    def _console(self, message: Any) -> None:
        # Chromium logs each 4xx answer as "Failed to load resource"; those are checked in `failed` instead.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _page_error(self, error: Any) -> None:
        self.errors.append(str(error))

    def urls(self) -> list[str]:
        return [request.url for request in self.requests]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ui_weights: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui-server")
    running = Server(root / "data", ui_weights, root / "server.log")
    running.start()
    yield running
    running.stop()


def _open(browser: Any, url: str) -> tuple[Any, Any, Watcher]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    watcher = Watcher(page)
    page.goto(f"{url}/ui")
    return context, page, watcher


def _decoded(page: Any, selector: str) -> np.ndarray:
    """The pixels the browser decoded for an <img>, read back through a canvas: (H, W, 4) uint8."""
    width, height, data = page.eval_on_selector(
        selector,
        """(img) => {
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const context = canvas.getContext("2d");
            context.drawImage(img, 0, 0);
            const bytes = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let text = "";
            for (let i = 0; i < bytes.length; i += 1) text += String.fromCharCode(bytes[i]);
            return [canvas.width, canvas.height, btoa(text)];
        }""",
    )
    return np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(height, width, 4)


def _pixels(data: bytes) -> np.ndarray:
    """An encoded image as RGBA pixels, as a canvas gives them, (H, W, 4) int."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"), dtype=np.int32)


def _check_views(page: Any, expected: Any, crop_tolerance: int = 0, close_with_escape: bool = False) -> None:
    """Toggle each view of the open mask dialog: the decoded picture changes, and is the API's own PNG
    (``expected(view)``: its pixels). A JPEG query crop is shown as the file itself: decoders may differ by a
    rounding step there."""
    page.wait_for_selector("#mask-dialog[data-loaded]")
    seen: dict[str, np.ndarray] = {}
    for view in VIEWS:
        page.check(f'#mask-views input[value="{view}"]')
        page.wait_for_selector(f'#mask-focus-image[data-view="{view}"]')
        page.wait_for_function("() => document.querySelector('#mask-focus-image').complete")
        seen[view] = _decoded(page, "#mask-focus-image")
        tolerance = crop_tolerance if view == "crop" else 0
        np.testing.assert_allclose(seen[view], expected(view), atol=tolerance, rtol=0, err_msg=view)
    for i, a in enumerate(VIEWS):
        for b in VIEWS[i + 1 :]:
            assert seen[a].shape == seen[b].shape, (a, b)
            assert not np.array_equal(seen[a], seen[b]), f"the {a} and {b} views show the same pixels"
    if close_with_escape:  # a modal <dialog> closes from the keyboard
        page.keyboard.press("Escape")
    else:
        page.click("#mask-close")
    page.wait_for_selector("#mask-dialog", state="hidden")


def _enroll(page: Any, pid: int, *, drop: bool = False, captured_at: str = "", metadata: str = "") -> None:
    paths = [_crop(pid, "00"), _crop(pid, "05")]
    if drop:  # as a person drags files from a file manager: a drop event carrying them
        files = [(p.name, base64.b64encode(p.read_bytes()).decode()) for p in paths]
        transfer = page.evaluate_handle(
            """(files) => {
                const transfer = new DataTransfer();
                for (const [name, data] of files) {
                    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                    transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
                }
                return transfer;
            }""",
            files,
        )
        page.dispatch_event("#enroll-drop", "drop", {"dataTransfer": transfer})
    else:
        page.set_input_files("#enroll-files", [str(p) for p in paths])
    assert page.locator("#enroll-chosen li").count() == 2
    page.fill("#enroll-identity", _identity(pid))
    page.fill("#enroll-camera", "")
    page.fill("#enroll-captured", captured_at)
    page.fill("#enroll-metadata", metadata)
    page.click("#enroll-submit")
    page.wait_for_selector(f"#enroll-status:has-text('Enrolled 2 crops of {_identity(pid)}.')")
    assert page.locator("#enroll-created li.entry-card").count() == 2


def test_enroll_search_masks_and_delete_in_a_browser(browser: Any, server: Server) -> None:
    # The precondition the search step relies on, by brute force over the same weights: among the enrolled
    # crops, the query's nearest is one of its own person's (see ui_weights for why).
    model = load_weights(server.env["REID_WEIGHTS"])
    transform = build_eval_transform(model.config)
    enrolled = [(pid, _crop(pid, shot)) for pid in PEOPLE for shot in ("00", "05")]
    with torch.no_grad():
        gallery = model.extractor(torch.stack([transform(Image.open(p).convert("RGB")) for _, p in enrolled]))
        probe = model.extractor(transform(Image.open(_crop(QUERY_PID, "01")).convert("RGB"))[None])
    gallery, probe = gallery.numpy(), probe.numpy()
    nearest = enrolled[int(((gallery - probe) ** 2).sum(1).argmin())][0]
    assert nearest == QUERY_PID, f"these weights rank person {nearest} first: choose another query"

    context, page, watcher = _open(browser, server.url)
    try:
        page.wait_for_selector("body[data-ready]")
        banner = page.inner_text("#health")
        assert "mobilenet_v2" in banner and "1280-d" in banner and "Mask generator\nyes" in banner
        assert page.locator("#untrained-warning").count() == 0  # trained weights: no warning
        page.click("#health summary")
        assert "note: test weights" in page.inner_text("#health .provenance")
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll("input, select, textarea, button")]
                .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label") && !c.textContent.trim())
                .map((c) => c.id || c.outerHTML)"""
        )
        assert unlabelled == [], f"controls without a label: {unlabelled}"

        # Enroll: two crops per person, one person by drag and drop, one with a capture time.
        page.click("#tab-enroll")
        for pid in PEOPLE:
            _enroll(
                page,
                pid,
                drop=pid == PEOPLE[0],
                captured_at="2026-01-02T03:04:05" if pid == PEOPLE[1] else "",
                metadata='{"site": "north gate"}' if pid == PEOPLE[0] else "",
            )
        page.wait_for_selector("#health:has-text('8 entries')")  # the banner follows the gallery

        # An API error is shown as its human message, not as JSON.
        page.set_input_files("#enroll-files", str(_crop(PEOPLE[0], "02")))
        page.fill("#enroll-identity", "someone")
        page.fill("#enroll-metadata", "not json")
        page.click("#enroll-submit")
        page.wait_for_selector("#error:not([hidden])")
        message = page.inner_text("#error-text")
        assert message.startswith("metadata must be a JSON object") and "{" not in message.split(":")[0]
        assert '"code"' not in message and "detail" not in message
        page.click("#error-close")
        page.fill("#enroll-metadata", "")

        # The gallery: four people, two crops each, thumbnails decoded at the crops' own size.
        page.click("#tab-gallery")
        cards = page.locator("#identity-list li.identity-card")
        page.wait_for_selector(f"#identity-list li[data-identity='{_identity(PEOPLE[-1])}']")
        assert [c.get_attribute("data-identity") for c in cards.all()] == [_identity(p) for p in PEOPLE]
        assert all("2 crops" in c.inner_text() for c in cards.all())
        page.wait_for_function("() => [...document.querySelectorAll('#identity-list img')].every(i => i.naturalWidth)")
        first = _decoded(page, "#identity-list li:first-child img")
        width, height = Image.open(_crop(PEOPLE[0], "00")).size
        assert first.shape == (height, width, 4)
        np.testing.assert_array_equal(first[..., :3], np.asarray(Image.open(_crop(PEOPLE[0], "00")).convert("RGB")))

        # Search with another shot of one of them: that identity first, a match, its best crop shown.
        page.click("#tab-search")
        page.set_input_files("#search-files", str(_crop(QUERY_PID, "01")))
        page.fill("#search-topk", "5")
        page.click("#search-submit")
        page.wait_for_selector("#search-results table.ranking tbody tr")
        rows = page.locator("#search-results table.ranking tbody tr")
        assert rows.first.get_attribute("data-identity") == _identity(QUERY_PID)
        assert "Match" in rows.first.inner_text()
        assert rows.count() == len(PEOPLE)
        assert "No threshold in use" in page.inner_text("#search-results .threshold")
        # The page says what the score means: these weights carry no false-match curve, so it is not calibrated.
        assert "1 / (1 + distance): not calibrated" in page.inner_text("#search-results .similarity-meaning")
        assert page.locator("#search-results ol.matches li").count() == 5
        page.wait_for_function("() => [...document.querySelectorAll('#search-results img')].every(i => i.naturalWidth)")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-search.png"), full_page=True)

        # With a threshold under the query's distances, no identity matches, and the page says which threshold.
        page.fill("#search-threshold", "0.001")
        page.click("#search-submit")
        page.wait_for_selector("#search-results .threshold:has-text('0.001')")
        assert page.locator("#search-results tr.is-match").count() == 0
        assert page.locator("#search-results .badge.miss").count() == len(PEOPLE)
        # A camera filter that keeps only a camera nobody was enrolled with: nothing left to rank.
        page.fill("#search-cameras", "c9")
        page.select_option("#search-camera-mode", "false")
        page.click("#search-submit")
        page.wait_for_selector("#search-results:has-text('No entries match the filters.')")
        page.fill("#search-cameras", "")
        page.fill("#search-threshold", "")
        page.click("#search-submit")
        page.wait_for_selector("#search-results table.ranking tbody tr")

        # Masks of the query crop (uploaded) and of the first result (enrolled): each view toggled.
        query_bytes = _crop(QUERY_PID, "01").read_bytes()
        page.click("#search-results .query-crops button")

        def query_view(view: str) -> np.ndarray:
            if view == "crop":
                return _pixels(query_bytes)
            files = {"file": ("q.jpg", query_bytes, "image/jpeg")}
            return _pixels(httpx.post(f"{server.url}/mask", params={"view": view}, files=files).content)

        _check_views(page, query_view, crop_tolerance=8)
        first_match = int(page.get_attribute("#search-results ol.matches li:first-child", "data-entry") or 0)
        page.click("#search-results ol.matches li:first-child button")

        def entry_view(view: str) -> np.ndarray:
            path = f"/gallery/{first_match}/image" if view == "crop" else f"/mask/{first_match}?view={view}"
            return _pixels(httpx.get(server.url + path).content)

        _check_views(page, entry_view, close_with_escape=True)

        # Delete one entry, then a whole identity, each after a confirmation; cancelling deletes nothing.
        page.focus("#tab-gallery")
        page.keyboard.press("Enter")  # the views switch from the keyboard too
        assert page.is_visible("#view-gallery") and not page.is_visible("#view-search")
        page.click(f"#identity-list li[data-identity='{_identity(PEOPLE[0])}'] button")
        page.wait_for_selector("#entry-list li.entry-card >> nth=1")
        facts = page.inner_text("#entry-list li.entry-card:first-child dl")
        assert "site\nnorth gate" in facts and "Size\n" in facts and "[object" not in facts
        page.click("#entry-list li.entry-card:first-child button.danger")
        page.click("#confirm-ok")
        page.wait_for_selector(f"#identity-heading:has-text('{_identity(PEOPLE[0])}: 1 crop')")
        page.click("#identity-delete")
        page.click("#confirm-cancel")
        assert page.locator(f"#identity-list li[data-identity='{_identity(PEOPLE[0])}']").count() == 1
        page.click("#identity-delete")
        page.click("#confirm-ok")
        page.wait_for_selector(f"#identity-list li[data-identity='{_identity(PEOPLE[0])}']", state="detached")
        assert page.locator("#identity-list li.identity-card").count() == len(PEOPLE) - 1
        assert _identity(PEOPLE[0]) not in [i["identity"] for i in httpx.get(f"{server.url}/identities").json()]
        page.wait_for_selector("#health:has-text('6 entries')")  # the banner follows the gallery

        # Nothing left the origin; no CSP violation or script error on the way.
        assert watcher.requests, "no request was recorded"
        assert all(u.startswith((server.url + "/", "blob:" + server.url + "/")) for u in watcher.urls())
        assert not watcher.errors, watcher.errors
        assert watcher.failed == [("POST", f"{server.url}/gallery", 422)]  # the bad metadata, and nothing else
    finally:
        context.close()


def test_page_works_under_a_path_prefix(browser: Any, server: Server) -> None:
    """Behind a proxy that serves the service at /reid/, the page asks for everything under /reid/."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)

    def proxy(route: Any) -> None:  # /reid/<path> is the service's /<path>; the page sees only /reid/
        route.fulfill(response=route.fetch(url=route.request.url.replace("/reid/", "/", 1)))

    context.route(f"{server.url}/reid/**", proxy)
    page = context.new_page()
    watcher = Watcher(page)
    try:
        page.goto(f"{server.url}/reid/ui")
        page.wait_for_selector("body[data-ready]")
        assert "mobilenet_v2" in page.inner_text("#health")
        assert watcher.requests and all(u.startswith(f"{server.url}/reid/") for u in watcher.urls()), watcher.urls()
        assert not watcher.errors and not watcher.failed, (watcher.errors, watcher.failed)
    finally:
        # A proxied request of the page's still in flight at close would raise its "response has been disposed"
        # in the next test's call (seen once in a full run).
        context.unroute_all(behavior="ignoreErrors")
        context.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """With REID_API_KEY, and no weights file: the untrained network the page must warn about."""
    root = tmp_path_factory.mktemp("ui-keyed")
    running = Server(root / "data", None, root / "server.log", REID_API_KEY=KEY, REID_BACKBONE="mobilenet_v2")
    running.start()
    yield running
    running.stop()


def test_page_asks_for_the_key_refuses_a_wrong_one_and_warns_when_untrained(browser: Any, keyed_server: Server) -> None:
    url = keyed_server.url
    # The shell and its assets need no key and hold no data; the data stays behind the key.
    shell = httpx.get(f"{url}/ui")
    assert shell.status_code == 200
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", shell.text), "an inline script in the shell"
    for path in ("/ui", "/ui/static/app.js", "/ui/static/api.js", "/ui/static/style.css"):
        response = httpx.get(url + path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy, path
        assert response.headers["x-content-type-options"] == "nosniff", path
    assert httpx.get(f"{url}/identities").status_code == 401
    assert httpx.get(f"{url}/gallery/1/image").status_code == 401

    context, page, watcher = _open(browser, url)
    try:
        page.wait_for_selector("#key-dialog[open]")
        page.wait_for_selector("#untrained-warning")
        assert "Untrained weights" in page.inner_text("#health")
        assert "meaningless" in page.inner_text("#untrained-warning")

        page.fill("#key-input", "not-the-key")
        page.click("#key-submit")
        page.wait_for_selector("#key-message:has-text('The service refused this key.')")
        assert page.is_visible("#key-dialog")
        assert page.evaluate("() => sessionStorage.getItem('reid-api-key')") is None

        page.fill("#key-input", KEY)
        page.click("#key-submit")
        page.wait_for_selector("#key-dialog", state="hidden")
        page.wait_for_selector("#gallery-empty:not([hidden])")
        assert page.evaluate("() => sessionStorage.getItem('reid-api-key')") == KEY
        # A reload keeps the key for the tab: no second prompt.
        page.reload()
        page.wait_for_selector("body[data-ready]")
        page.wait_for_selector("#gallery-empty:not([hidden])")
        assert not page.is_visible("#key-dialog")

        # 18 crops go up in two requests (16 a request), and all of them are enrolled.
        page.click("#tab-enroll")
        crops = [_crop(20, f"{shot:02d}") for shot in range(10)] + [_crop(21, f"{shot:02d}") for shot in range(8)]
        page.set_input_files("#enroll-files", [str(p) for p in crops])
        # A name that is markup stays text: the page builds no HTML from what the service says.
        name = '<img src=x onerror="window.pwned=1">many'
        page.fill("#enroll-identity", name)
        page.click("#enroll-submit")
        page.wait_for_selector("#enroll-status:has-text('Enrolled 18 crops of')")
        assert page.locator("#enroll-created li.entry-card").count() == 18
        posts = [r for r in watcher.requests if r.method == "POST" and r.url == f"{url}/gallery"]
        assert len(posts) == 2 and all(r.headers.get("x-api-key") == KEY for r in posts)
        page.click("#tab-gallery")
        card = page.locator("#identity-list li.identity-card")
        card.filter(has_text="18 crops").wait_for()
        assert card.get_attribute("data-identity") == name and name in card.inner_text()
        assert page.locator("#identity-list img:not(.crop)").count() == 0
        assert page.evaluate("() => window.pwned") is None

        # Weights without a mask generator: the mask views say so (the API's message) and only the crop shows.
        card.locator("button").click()
        page.click("#entry-list li.entry-card:first-child button.secondary")
        page.wait_for_selector("#mask-dialog[data-loaded]")
        assert "no mask generator" in page.inner_text("#mask-message")
        assert page.is_disabled('#mask-views input[value="mask"]')
        assert page.is_enabled('#mask-views input[value="crop"]')
        assert page.get_attribute("#mask-focus-image", "data-view") == "crop"
        page.keyboard.press("Escape")

        # The key travels as a header, never in a URL; nothing leaves the origin.
        sent = [r for r in watcher.requests if r.headers.get("x-api-key") == KEY]
        assert any(r.url.startswith(f"{url}/identities") for r in sent)
        assert all(KEY not in u for u in watcher.urls())
        assert all(u.startswith((url + "/", "blob:" + url + "/")) for u in watcher.urls())

        # The policy is enforced, not only sent: a script added inline does not run, and the browser says why.
        with page.expect_console_message(lambda m: "Content Security Policy" in m.text) as violation:
            ran = page.evaluate(
                """() => {
                    const script = document.createElement("script");
                    script.textContent = "window.inlineRan = true";
                    document.head.append(script);
                    return window.inlineRan === true;
                }"""
            )
        assert ran is False
        assert "script-src 'self'" in violation.value.text
    finally:
        context.close()
