"""The People view of the page at /ui in a real headless Chromium against a real uvicorn process: people grouped
from sightings sent over HTTP (real CUHK03 crops), listed by size and by recency, one person's timeline per
camera, and the operator's review (name, merge, split, not a person), each checked on the page and in the API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.server import Server
from tests.conftest import SHARED_DATA, require_shared
from tests.ui.conftest import ARTIFACTS
from tests.ui.test_page import TIMEOUT_MS, Watcher

pytestmark = [pytest.mark.shared, pytest.mark.slow]

# Weights without a calibrated threshold and a join threshold this small: only a tracklet whose mean template
# is the same pictures' joins someone, so the grouping below is known exactly.
JOIN_THRESHOLD = "1e-3"


def _crop(pid: int, shot: int) -> Path:
    return require_shared(SHARED_DATA / "cuhk03-detected" / "val") / f"{pid:04d}_{shot:02d}.jpg"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ui_weights: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ui-people")
    running = Server(
        root / "data",
        ui_weights,
        root / "server.log",
        REID_JOIN_THRESHOLD=JOIN_THRESHOLD,
        REID_REGROUP_INTERVAL_S="0",  # no re-grouping behind the test's back
    )
    running.start()
    yield running
    running.stop()


def _send(url: str, crops: list[Path], camera: str, track: str, start_minute: int) -> dict[str, Any]:
    """One tracklet: the crops two seconds apart from 10:<start_minute> on 2026-03-01 (UTC)."""
    sightings = [
        {"camera": camera, "track": track, "captured_at": f"2026-03-01T10:{start_minute:02d}:{2 * i:02d}Z"}
        for i in range(len(crops))
    ]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in crops]
    response = httpx.post(f"{url}/sightings", files=files, data={"sightings": json.dumps(sightings)}, timeout=60)
    assert response.status_code == 201, response.text
    (tracklet,) = response.json()["tracklets"]
    return tracklet


def _person(url: str, person_id: int) -> dict[str, Any]:
    response = httpx.get(f"{url}/people/{person_id}")
    assert response.status_code == 200, response.text
    return response.json()


def _card(page: Any, person_id: int) -> Any:
    return page.locator(f"#people-list li.person-card[data-person='{person_id}']")


def _listed(page: Any) -> list[int]:
    return [int(c.get_attribute("data-person")) for c in page.locator("#people-list li.person-card").all()]


def _wait_listed(page: Any, expected: list[int]) -> None:
    ids = ",".join(str(i) for i in expected)
    cards = "[...document.querySelectorAll('#people-list li.person-card')]"
    page.wait_for_function(f"() => {cards}.map(c => c.dataset.person).join() === '{ids}'")


def test_review_people_in_a_browser(browser: Any, server: Server) -> None:
    url = server.url
    # Five people from three cameras' tracklets. Ann's c2 tracklet is one of her c1 pictures again: it joins her
    # by appearance (distance 0 to that entry), so one person has two tracks and two visits.
    ann = _send(url, [_crop(12, 0), _crop(12, 1)], "c1", "1", 0)
    assert ann["joined"] == "new"
    again = _send(url, [_crop(12, 0)], "c2", "5", 5)
    assert (again["joined"], again["person"]) == ("match", ann["person"]), json.dumps(again)
    bob = _send(url, [_crop(13, 0), _crop(13, 1), _crop(13, 2)], "c1", "2", 10)
    cam = _send(url, [_crop(14, 0), _crop(14, 1)], "c2", "6", 12)
    dot = _send(url, [_crop(15, 0)], "c1", "3", 15)
    eve = _send(url, [_crop(16, 0), _crop(16, 1)], "c3", "9", 20)
    a, b, c, d, e = (t["person"] for t in (ann, bob, cam, dot, eve))
    assert len({a, b, c, d, e}) == 5
    assert httpx.get(f"{url}/people", params={"status": "provisional"}).headers["X-Total-Count"] == "5"
    counted = httpx.get(f"{url}/people/count")
    assert counted.status_code == 200 and counted.json()["people"] == 5, counted.text

    context = browser.new_context(viewport={"width": 1366, "height": 900}, timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    watcher = Watcher(page)
    try:
        page.goto(f"{url}/ui")
        page.wait_for_selector("body[data-ready]")
        assert not any(u.startswith(f"{url}/people") for u in watcher.urls()), "people are loaded when looked at"
        page.click("#tab-people")
        assert page.is_visible("#view-people") and not page.is_visible("#view-gallery")

        # The provisional people, largest first (ties by id): Ann (3 sightings, 2 tracks, a thumbnail per camera).
        _wait_listed(page, [a, b, c, e, d])
        assert page.inner_text("#people-total") == "5 provisional people"
        assert page.inner_text("#people-range") == "1–5 of 5"
        assert page.is_disabled("#people-prev") and page.is_disabled("#people-next")
        first = _card(page, a)
        assert "3 sightings · 2 tracks" in first.inner_text() and "last seen" in first.inner_text()
        assert [f.get_attribute("data-camera") for f in first.locator("figure.person-thumb").all()] == ["c2", "c1"]
        assert "1 sighting · 1 track" in _card(page, d).inner_text()
        page.wait_for_function("() => [...document.querySelectorAll('#people-list img')].every(i => i.naturalWidth)")
        # The counter: five people seen, three of them from 10:11 on.
        page.wait_for_selector("#people-seen[data-count='5']")
        page.fill("#people-count-after", "2026-03-01T10:11:00")  # local time: the context runs in UTC
        page.click("#people-count-submit")
        page.wait_for_selector("#people-seen[data-count='3']")
        assert "in this window" in page.inner_text("#people-counter")
        page.fill("#people-count-after", "")
        page.fill("#people-count-cameras", "c2")
        page.click("#people-count-submit")
        page.wait_for_selector("#people-seen[data-count='2']")  # Ann and Cam passed c2
        page.fill("#people-count-cameras", "")
        page.click("#people-count-submit")
        page.wait_for_selector("#people-seen[data-count='5']")

        # Last seen first, from the keyboard.
        page.focus("#people-order input[value='recent']")
        page.keyboard.press("Space")
        _wait_listed(page, [e, d, c, b, a])
        page.check("#people-order input[value='size']")
        _wait_listed(page, [a, b, c, e, d])

        # Open Ann: her two visits, one per camera lane, each with its crops as selectable sightings.
        first.locator("button").click()
        page.wait_for_selector(f"#person-detail[data-person='{a}']")
        assert page.inner_text("#person-heading") == f"Person {a}"
        facts = page.inner_text("#person-facts")
        assert "Sightings\n3" in facts and "Tracks\n2" in facts and "null" not in facts and "undefined" not in facts
        lanes = page.locator("#person-timeline section.camera-lane")
        assert [lane.get_attribute("data-camera") for lane in lanes.all()] == ["c1", "c2"]
        assert "1 visit · 2 sightings" in lanes.nth(0).inner_text()
        assert "1 visit · 1 sighting" in lanes.nth(1).inner_text()
        assert page.locator("#person-route li").count() == 2
        timeline = _person(url, a)
        c2_entries = next(v["entries"] for v in timeline["visits"] if v["camera"] == "c2")
        shown = [int(s.get_attribute("data-entry")) for s in page.locator("#person-timeline .sighting").all()]
        assert sorted(shown) == sorted(x for v in timeline["visits"] for x in v["entries"])
        page.wait_for_function(
            "() => [...document.querySelectorAll('#person-timeline img')].every(i => i.naturalWidth)"
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-people.png"), full_page=True)

        # Split: one c2 sighting selected (its track comes along) goes to a new provisional person.
        assert page.is_disabled("#person-split")
        sighting = page.locator(f"#person-timeline .sighting[data-entry='{c2_entries[0]}']")
        sighting.focus()
        page.keyboard.press("Enter")  # selectable from the keyboard
        assert sighting.get_attribute("aria-pressed") == "true"
        assert page.inner_text("#person-split") == "Split off 1 sighting"
        page.click("#person-split")
        page.wait_for_selector(f"#person-detail[data-person='{a}'] #person-sightings:has-text('2')")
        page.wait_for_selector("#person-message:has-text('moved to a new person')")
        assert [lane.get_attribute("data-camera") for lane in lanes.all()] == ["c1"]
        new_people = [p for p in httpx.get(f"{url}/people").json() if p["id"] not in (a, b, c, d, e)]
        assert len(new_people) == 1
        split = new_people[0]
        assert (split["status"], split["sightings"]) == ("provisional", 1)
        assert [s["camera"] for s in split["cameras"]] == ["c2"]
        assert f"Person {split['id']}" in page.inner_text("#person-message")
        page.wait_for_selector(f"#people-list li.person-card.is-fresh[data-person='{split['id']}']")
        assert _person(url, a)["person"]["sightings"] == 2
        assert page.locator("#people-list li.person-card").count() == 6

        # Name Bob: his card and the open person say the name; the API too, and he leaves the provisional list.
        _card(page, b).locator("button").click()
        page.wait_for_selector(f"#person-detail[data-person='{b}']")
        page.fill("#person-name", "Bob")
        page.press("#person-name", "Enter")
        page.wait_for_selector(f"#person-detail[data-person='{b}'][data-status='named']")
        assert page.inner_text("#person-heading") == "Bob"
        page.wait_for_selector(f"#people-list li.person-card[data-person='{b}']", state="detached")
        named = _person(url, b)["person"]
        assert (named["status"], named["identity"]) == ("named", "Bob")
        page.select_option("#people-status", "named")
        _wait_listed(page, [b])
        assert "Bob" in _card(page, b).inner_text() and "Named" in _card(page, b).inner_text()
        assert "Bob" in [i["identity"] for i in httpx.get(f"{url}/identities").json()]

        # Merge Cam into Bob, picking Bob from the list: Cam leaves the list, Bob has 3 + 2 sightings.
        page.select_option("#people-status", "")  # all but merged
        _card(page, c).wait_for()
        _card(page, c).locator("button").click()
        page.wait_for_selector(f"#person-detail[data-person='{c}']")
        page.click("#person-merge-pick")
        page.wait_for_selector("#people-pick:not([hidden])")
        assert page.is_disabled(f"#people-list li[data-person='{c}'] button")  # not into itself
        page.keyboard.press("Escape")  # changing one's mind
        page.wait_for_selector("#people-pick", state="hidden")
        page.click("#person-merge-pick")
        merge_button = _card(page, b).locator("button")
        assert merge_button.get_attribute("aria-label") == f"Merge Person {c} into Bob"
        merge_button.click()
        page.wait_for_selector(f"#person-detail[data-person='{b}'] #person-sightings:has-text('5')")
        page.wait_for_selector(f"#people-list li.person-card[data-person='{c}']", state="detached")
        assert "merged into Bob" in page.inner_text("#person-message")
        merged = _person(url, c)["person"]
        assert (merged["status"], merged["merged_into"]) == ("merged", b)
        assert _person(url, b)["person"]["sightings"] == 5
        assert "5 sightings" in _card(page, b).inner_text()
        page.wait_for_selector("#people-seen[data-count='5']")  # Ann, Bob (with Cam), Dot, Eve and the split

        # A refused decision shows the service's sentence: Bob into a person that does not exist (404), and into
        # himself by number (409).
        page.fill("#person-merge-into", "424242")
        page.click("#person-merge-submit")
        page.wait_for_selector("#error:not([hidden])")
        assert "424242" in page.inner_text("#error-text") and "{" not in page.inner_text("#error-text")
        page.click("#error-close")
        page.fill("#person-merge-into", str(b))
        page.click("#person-merge-submit")
        page.wait_for_selector("#error-text:has-text('a person cannot be merged into itself')")
        page.click("#error-close")
        assert _person(url, b)["person"]["status"] == "named"

        # Not a person: Dot, from the provisional list; listed apart under "Not a person", no longer counted.
        page.select_option("#people-status", "provisional")
        _card(page, d).wait_for()
        _card(page, d).locator("button").click()
        page.wait_for_selector(f"#person-detail[data-person='{d}']")
        page.click("#person-ignore")
        page.wait_for_selector(f"#person-detail[data-person='{d}'][data-status='ignored']")
        page.wait_for_selector(f"#people-list li.person-card[data-person='{d}']", state="detached")
        assert page.is_disabled("#person-ignore")
        assert _person(url, d)["person"]["status"] == "ignored"
        page.wait_for_selector("#people-seen[data-count='4']")
        assert httpx.get(f"{url}/people/count").json()["people"] == 4
        _wait_listed(page, [a, e, split["id"]])
        page.select_option("#people-status", "ignored")
        _wait_listed(page, [d])

        # A merged person opens as a record: where it went, and no decisions left on it.
        page.select_option("#people-status", "merged")
        _wait_listed(page, [c])
        _card(page, c).locator("button").click()
        page.wait_for_selector(f"#person-detail[data-person='{c}'][data-status='merged']")
        assert page.is_disabled("#person-name-submit") and page.is_disabled("#person-merge-submit")
        assert page.is_disabled("#person-ignore")
        page.click(f"#person-facts button:has-text('Person {b}')")
        page.wait_for_selector(f"#person-detail[data-person='{b}']")
        page.click("#person-close")
        page.wait_for_selector("#person-detail", state="hidden")

        # Every control has a label; nothing left the origin; no CSP violation or script error on the way.
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll("#view-people input, #view-people select, #view-people button")]
                .filter((c) => !(c.labels && c.labels.length) && !c.getAttribute("aria-label") && !c.textContent.trim())
                .map((c) => c.id || c.outerHTML)"""
        )
        assert unlabelled == [], f"controls without a label: {unlabelled}"
        assert all(u.startswith((url + "/", "blob:" + url + "/")) for u in watcher.urls())
        assert not watcher.errors, watcher.errors
        assert watcher.failed == [
            ("POST", f"{url}/people/{b}/merge", 404),
            ("POST", f"{url}/people/{b}/merge", 409),
        ], watcher.failed
    finally:
        context.close()
