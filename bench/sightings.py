"""People found among unnamed sightings: the CUHK03 val crops (or another data set's val split, ``--root``)
sent to ``POST /sightings`` as a tracker would (the app in this process, its real routes), grouped online, then
re-grouped (``POST /people/regroup``); scored against the true identities, which the service never sees.

    python -m bench.sightings --weights runs/strong/model.safetensors

Two ways of sending, each reported: every crop alone, in a shuffled order (``crops``), and each person's shots
from one camera as one tracklet (``tracklets``). Figures: pairwise precision and recall (over pairs of crops put
together), BCubed precision, recall and F, and the number of people found against the true number.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import product
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from bench.common import Table, add_common_args, report, require_weights_and_manifest, setup

logger = logging.getLogger("bench.sightings")

SHARED_CUHK03 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-detected"
MODES = ("crops", "tracklets")
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def val_rows(root: Path) -> list[tuple[Path, int, int]]:
    with open(root / "manifest.csv") as f:
        return [(root / r["path"], int(r["pid"]), int(r["camid"])) for r in csv.DictReader(f) if r["split"] == "val"]


def scores(labels: list[str], truth: list[int]) -> dict[str, float]:
    """Pairwise precision/recall, BCubed precision/recall/F, people found (predicted groups) and true people."""
    pairs_same = Counter(zip(labels, truth, strict=True))
    by_label, by_truth = Counter(labels), Counter(truth)

    def pairs(n: int) -> int:
        return n * (n - 1) // 2

    together_right = sum(pairs(n) for n in pairs_same.values())
    together = sum(pairs(n) for n in by_label.values())
    truly = sum(pairs(n) for n in by_truth.values())
    precision = [pairs_same[(lab, t)] / by_label[lab] for lab, t in zip(labels, truth, strict=True)]
    recall = [pairs_same[(lab, t)] / by_truth[t] for lab, t in zip(labels, truth, strict=True)]
    bp, br = float(np.mean(precision)), float(np.mean(recall))
    return {
        "pair_precision": together_right / together if together else 1.0,
        "pair_recall": together_right / truly if truly else 1.0,
        "bcubed_precision": bp,
        "bcubed_recall": br,
        "bcubed_f": 2 * bp * br / (bp + br),
        "people": len(by_label),
        "true_people": len(by_truth),
    }


def run(
    weights: Path,
    rows: list[tuple[Path, int, int]],
    mode: str,
    threshold: float | None,
    aggregation: str,
    seed: int,
    provisional_fmr: float | None = None,
    spread_correction: bool | None = None,
) -> dict[str, dict[str, float] | float | str | None]:
    """Send the crops, score the online groups, re-group, score again. ``provisional_fmr``: the service's
    REID_PROVISIONAL_JOIN_FMR (None: its default)."""
    rng = np.random.default_rng(seed)
    sizes = [Image.open(path).size for path, _, _ in rows]  # the detector's box: quality = its area (no confidence)
    if mode == "crops":
        units = [[i] for i in rng.permutation(len(rows)).tolist()]
    else:
        by_track: dict[tuple[int, int], list[int]] = {}
        for i, (_, pid, camid) in enumerate(rows):
            by_track.setdefault((pid, camid), []).append(i)
        keys = sorted(by_track)
        units = [by_track[keys[k]] for k in rng.permutation(len(keys)).tolist()]
    with tempfile.TemporaryDirectory(prefix="bench-sightings-") as data_dir:
        settings = Settings(
            data_dir=Path(data_dir), weights=weights, device="cpu", backend="torch", allow_unauthenticated=True,
            join_threshold=threshold, tracklet_aggregation=aggregation, regroup_interval_s=0,
            **({} if provisional_fmr is None else {"provisional_join_fmr": provisional_fmr}),
            **({} if spread_correction is None else {"tracklet_spread_correction": spread_correction}),
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            label_of: dict[int, int] = {}  # entry id -> row
            started = time.perf_counter()
            join_s = []
            source = provisional = None
            for u, members in enumerate(units):
                at = (T0 + timedelta(minutes=u)).isoformat()
                files = [("files", (rows[i][0].name, rows[i][0].read_bytes(), "image/jpeg")) for i in members]
                track = {"track": f"t{u}"} if mode == "tracklets" else {}
                sightings = [
                    {"camera": f"c{rows[i][2]}", "captured_at": at, "box": [0, 0, *sizes[i]], **track} for i in members
                ]
                begin = time.perf_counter()
                answer = client.post("/sightings", files=files, data={"sightings": json.dumps(sightings)})
                join_s.append(time.perf_counter() - begin)
                answer.raise_for_status()
                body = answer.json()
                threshold, source = body["threshold"], body["threshold_source"]
                provisional = body["provisional_threshold"]
                entries = [e for t in body["tracklets"] for e in t["entries"]]
                label_of.update(zip(entries, members, strict=True))
            send_s = time.perf_counter() - started

            def labels() -> tuple[list[str], list[int]]:
                got, truth = [], []
                offset = 0
                while True:
                    page = client.get("/gallery", params={"offset": offset, "limit": 1000}).json()
                    for item in page["items"]:
                        got.append(item["identity"])
                        truth.append(rows[label_of[item["id"]]][1])
                    offset += len(page["items"])
                    if offset >= page["total"]:
                        return got, truth

            online = scores(*labels())
            regrouped = client.post("/people/regroup")
            regrouped.raise_for_status()
            batch = scores(*labels())
    return {
        "online": online,
        "regrouped": batch,
        "threshold": threshold,
        "source": source,
        "provisional": provisional,
        "send_s": send_s,
        "request_p50_ms": 1e3 * float(np.median(join_s)),
        "regroup_s": regrouped.json()["seconds"],
        "units": len(units),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.sightings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="the weights file served")
    parser.add_argument("--root", type=Path, default=SHARED_CUHK03, help="CUHK03 with manifest.csv (val split)")
    parser.add_argument(
        "--thresholds",
        type=lambda t: [float(v) for v in t.split(",") if v],
        default=[],
        help="join thresholds to try (default: the weights' calibrated one, as the service takes it)",
    )
    parser.add_argument(
        "--provisional-fmrs",
        type=lambda t: [float(v) for v in t.split(",") if v],
        default=[],
        help="REID_PROVISIONAL_JOIN_FMR values to try (default: the service's)",
    )
    parser.add_argument("--aggregations", default="mean", help="tracklet templates: mean, quality or both (comma)")
    parser.add_argument("--seed", type=int, default=0, help="the order the crops arrive in")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_weights_and_manifest(parser, args)
    results = setup(args)
    started = time.time()
    rows = val_rows(args.root)
    table = Table(
        f"Unnamed sightings grouped into people, {args.root.name} val",
        [
            "sent as", "threshold", "provisional threshold", "tracklet template", "step", "pair precision",
            "pair recall", "BCubed P", "BCubed R", "BCubed F", "people found", "true people", "request p50 ms",
            "regroup s",
        ],
    )  # fmt: skip
    for mode in MODES:
        for threshold, provisional_fmr, aggregation in product(
            args.thresholds or [None], args.provisional_fmrs or [None], args.aggregations.split(",")
        ):
            if mode == "crops" and aggregation != args.aggregations.split(",")[0]:
                continue  # one crop per tracklet: the template is the crop's whatever the aggregation
            out = run(args.weights, rows, mode, threshold, aggregation, args.seed, provisional_fmr)
            logger.info("%s threshold %s: %s", mode, out["threshold"], out)
            fmr = "" if provisional_fmr is None else f" (FMR {provisional_fmr:g})"
            for step in ("online", "regrouped"):
                s = out[step]
                assert isinstance(s, dict)
                table.add(
                    mode, f"{out['threshold']:.3f} ({out['source']})", f"{out['provisional']:.3f}{fmr}",
                    aggregation if mode != "crops" else "-", step, s["pair_precision"], s["pair_recall"],
                    s["bcubed_precision"], s["bcubed_recall"], s["bcubed_f"], s["people"], s["true_people"],
                    out["request_p50_ms"], out["regroup_s"],
                )  # fmt: skip
    table.notes.append(
        f"{len(rows)} crops of {args.root.name} (manifest split val), sent in a shuffled order (seed {args.seed}), one "
        "request per crop (crops) or per person and camera (tracklets, one track id each, a minute apart); online: "
        "the groups POST /sightings made, in arrival order (provisional people joined under the provisional "
        "threshold, identities under the join one); regrouped: after POST /people/regroup. Pair: over all "
        "pairs of crops; BCubed: per crop, averaged. The service never sees the identities."
    )
    report("Unnamed sightings grouped into people", "bench.sightings", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
