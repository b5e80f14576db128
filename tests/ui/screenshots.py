"""The README's screenshots of the page, made from synthetic people (real data sets' terms forbid copying their
crops into the repository): ``python -m tests.ui.screenshots --out docs --weights runs/demo/model.safetensors
--threshold 3`` after ``python -m training demo --out runs/demo && python -m training export --run runs/demo``.

Enrolls five synthetic identities (training.data.synthetic) through the page of a real uvicorn process, searches
with another crop of one of them, and saves the search view and the mask views of the best match."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.app.server import Server
from tests.conftest import MOBILENET_WEIGHTS
from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS, build_ui_weights
from training.data.synthetic import generate_synthetic_market1501

logger = logging.getLogger(__name__)
ALL_IMAGES_DECODED = "() => [...document.querySelectorAll('#search-results img')].every(i => i.naturalWidth)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for ui-search.png and ui-masks.png")
    parser.add_argument("--people", type=int, default=5, help="synthetic identities to enroll")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights to serve, e.g. `python -m training demo`'s export; default: the browser tests' weights",
    )
    parser.add_argument("--threshold", default="26", help="the search's L2 threshold, to show match and no match")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_synthetic_market1501(root / "synthetic", num_ids=12, images_per_id=6, num_cams=2)
        crops: dict[int, list[Path]] = {}
        for path in sorted((data / "bounding_box_train").glob("*.jpg")):
            crops.setdefault(int(path.name[:4]), []).append(path)
        people = sorted(crops)[: args.people]
        weights = args.weights or build_ui_weights(root / "ui.safetensors", MOBILENET_WEIGHTS)
        server = Server(root / "data", weights, root / "server.log")
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{server.url}/ui")
                page.wait_for_selector("body[data-ready]")
                page.click("#tab-enroll")
                for pid in people:
                    page.set_input_files("#enroll-files", [str(p) for p in crops[pid][:3]])
                    page.fill("#enroll-identity", f"person-{pid:02d}")
                    page.fill("#enroll-camera", "c1")
                    page.click("#enroll-submit")
                    page.wait_for_selector(f"#enroll-status:has-text('of person-{pid:02d}.')")
                page.click("#tab-search")
                page.set_input_files("#search-files", str(crops[people[2]][4]))
                page.fill("#search-topk", "6")
                page.fill("#search-threshold", args.threshold)
                page.click("#search-submit")
                page.wait_for_selector("#search-results table.ranking")
                page.wait_for_function(ALL_IMAGES_DECODED)
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out / "ui-search.png"), full_page=True)
                page.click("#search-results ol.matches li:first-child button")
                page.wait_for_selector("#mask-dialog[data-loaded]")
                page.check('#mask-views input[value="hidden"]')
                page.locator("#mask-dialog").screenshot(path=str(args.out / "ui-masks.png"))
                browser.close()
        finally:
            server.stop()
    logger.info("wrote %s and %s", args.out / "ui-search.png", args.out / "ui-masks.png")


if __name__ == "__main__":
    main()
