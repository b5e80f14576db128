"""Accuracy through the service, per backend: the CUHK03 val gallery enrolled with ``POST /gallery`` and every
query asked with ``POST /query`` (the app in this process, its real routes), for each REID_BACKEND. Rank-1 and
mAP are computed from the served rankings, and each backend is compared with fp32 PyTorch's figures: a backend
that passes the parity check must find the same people (the goal: within 0.5 points).

    python -m bench.served_accuracy --weights runs/strong/model.safetensors

Calibration (INT8) and the parity check read ``--calibration``: CUHK03 *train* crops by default, other people
than the val crops scored here (a site would calibrate on its gallery's own stored crops at first start).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.backends import KINDS, BackendError
from app.config import Settings
from app.main import create_app
from bench.common import Table, add_common_args, report, require_weights_and_manifest, setup

logger = logging.getLogger("bench.served_accuracy")

SHARED_CUHK03 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cuhk03-detected"
FILES_PER_REQUEST = 64


def _rows(manifest: Path) -> list[tuple[Path, int, int]]:
    """(path, pid, camid) of the val split, from the manifest (``path,pid,camid,split``)."""
    import csv

    with open(manifest) as f:
        return [
            (manifest.parent / r["path"], int(r["pid"]), int(r["camid"]))
            for r in csv.DictReader(f)
            if r["split"] == "val"
        ]


def served_figures(
    weights: Path, backend: str, calibration: Path, rows: list[tuple[Path, int, int]], query_camid: int, **bars: float
) -> dict:
    """Rank-1 and mAP (CUHK03 protocol: camera ``query_camid`` queries, the other camera the gallery) from the
    rankings ``POST /query`` returns when the service runs with ``backend``."""
    from training.evaluation import rank_metrics

    gallery = [r for r in rows if r[2] != query_camid]
    queries = [r for r in rows if r[2] == query_camid]
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as data_dir:
        # The app in this process only, reached by no network: no key to ask for.
        settings = Settings(
            data_dir=Path(data_dir), weights=weights, device="cpu", backend=backend, calibration_dir=calibration,
            max_files_per_request=FILES_PER_REQUEST, allow_unauthenticated=True, **bars,
        )  # fmt: skip
        started = time.perf_counter()
        with TestClient(create_app(settings)) as client:
            start_s = time.perf_counter() - started
            health = client.get("/health").json()["backends"]["extractor"]
            index_of: dict[int, int] = {}
            for start in range(0, len(gallery), FILES_PER_REQUEST):
                batch = gallery[start : start + FILES_PER_REQUEST]
                for i, (path, pid, camid) in enumerate(batch):
                    files = [("files", (path.name, path.read_bytes(), "image/jpeg"))]
                    r = client.post("/gallery", files=files, data={"identity": str(pid), "camera": str(camid)})
                    r.raise_for_status()
                    index_of[r.json()[0]["id"]] = start + i
            distances = np.full((len(queries), len(gallery)), np.inf)
            for start in range(0, len(queries), FILES_PER_REQUEST):
                batch = queries[start : start + FILES_PER_REQUEST]
                files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p, _, _ in batch]
                r = client.post("/query", files=files, data={"top_k": str(len(gallery))})
                r.raise_for_status()
                for q, result in enumerate(r.json()["results"]):
                    for match in result["matches"]:
                        distances[start + q, index_of[match["id"]]] = match["distance"]
    metrics = rank_metrics(
        distances,
        np.array([r[1] for r in queries]),
        np.array([r[1] for r in gallery]),
        np.array([r[2] for r in queries]),
        np.array([r[2] for r in gallery]),
    )
    return {
        "serving": health["name"],
        "parity": health["parity"],
        "rank1": 100 * float(metrics.cmc[0]),
        "mAP": 100 * metrics.mAP,
        "queries": metrics.num_valid_queries,
        "gallery": len(gallery),
        "start_s": start_s,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.served_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="the weights file served")
    parser.add_argument("--root", type=Path, default=SHARED_CUHK03, help="CUHK03 with manifest.csv (val split)")
    parser.add_argument("--calibration", type=Path, default=SHARED_CUHK03 / "train", help="crops for INT8 and parity")
    parser.add_argument("--query-camid", type=int, default=0, help="the queries' camera (the gallery: the others)")
    parser.add_argument(
        "--backends",
        type=lambda t: [v for v in t.split(",") if v],
        default=[*KINDS, "auto"],
        help="REID_BACKEND values to serve with (torch first: the fp32 reference)",
    )
    parser.add_argument(
        "--parity-min-nn-agreement", type=float, default=None,
        help="REID_PARITY_MIN_NN_AGREEMENT of the servers (default: the service's); lower it to serve, and score, "
        "what the parity check would refuse",
    )  # fmt: skip
    parser.add_argument("--parity-min-cosine-reduced", type=float, default=None, help="likewise")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_weights_and_manifest(parser, args)
    unknown = [b for b in args.backends if b not in ("auto", *KINDS)]
    if unknown:
        parser.exit(2, f"bench.served_accuracy: unknown backend {unknown[0]!r}; choose auto, {', '.join(KINDS)}\n")
    results = setup(args)
    started = time.time()
    rows = _rows(args.root / "manifest.csv")
    bars = {
        name: value
        for name, value in (
            ("parity_min_nn_agreement", args.parity_min_nn_agreement),
            ("parity_min_cosine_reduced", args.parity_min_cosine_reduced),
        )
        if value is not None
    }
    figures = {}
    for backend in args.backends:
        logger.info("serving with REID_BACKEND=%s", backend)
        try:
            figures[backend] = served_figures(args.weights, backend, args.calibration, rows, args.query_camid, **bars)
        except BackendError as exc:  # refused at start-up: a row saying why
            logger.warning("%s: %s", backend, exc)
            figures[backend] = {"error": str(exc).splitlines()[0][:200]}
    reference = figures.get("torch", {})
    table = Table(
        "Accuracy through the service, per backend (CUHK03 val)",
        ["REID_BACKEND", "serving", "rank-1", "mAP", "rank-1 - fp32", "mAP - fp32", "parity", "start-up s"],
    )
    for backend, f in figures.items():
        if "error" in f:
            table.add(backend, f"refused: {f['error']}", None, None, None, None, None, None)
            continue
        p = f["parity"]
        parity = (
            "(the reference)"
            if p is None
            else f"cos {p['min_cosine']:.4f}"
            + ("" if p["nn_agreement"] is None else f", NN {100 * p['nn_agreement']:.1f}%")
        )
        d1 = f["rank1"] - reference["rank1"] if "rank1" in reference else None
        dm = f["mAP"] - reference["mAP"] if "mAP" in reference else None
        table.add(backend, f["serving"], f["rank1"], f["mAP"], d1, dm, parity, f["start_s"])
    some = next((f for f in figures.values() if "queries" in f), None)
    table.notes.append(
        f"{args.weights}; {some['queries'] if some else '?'} queries (camera {args.query_camid}) against "
        f"{some['gallery'] if some else '?'} gallery crops, each enrolled with POST /gallery and asked with POST "
        "/query (top_k = the gallery: every distance), rank-1 and mAP from the served distances with same-camera "
        f"removal; calibration and parity crops: {args.calibration}. Each backend starts on an empty data folder, "
        "so the start-up time includes its export and quantisation."
        + (f" Parity bars lowered for this run: {bars}." if bars else "")
    )
    report("Accuracy through the service", "bench.served_accuracy", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
