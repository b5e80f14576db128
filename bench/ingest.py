"""A tracker's output, ingested: frames/s of ``reid-admin ingest``'s pipeline and the people it comes out as.

    python -m bench.ingest --weights runs/strong-256x128/model.safetensors

Real CUHK03 val crops (or another data set's val split, ``--root``) are composited into a clip per camera: each
person of the split walks across a background, showing that camera's shots of them in turn, several people in the
frame at once, with the MOTChallenge file a tracker would write (one track per person and camera). The clips go
through the ingest pipeline (decode, best crops per track, ``POST /sightings`` in batches) into the app in this
process, the second camera's minutes after the first's. Reported: frames/s per camera (decoding, cutting, sending
and the service's embedding together, as a user's run), then how the tracks were grouped into people across the
cameras, online and after ``POST /people/regroup``, scored against the true identities that the service never sees.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.ingest import Options, ingest
from app.main import create_app
from bench.common import Table, add_common_args, report, require_weights_and_manifest, setup
from bench.sightings import SHARED_CUHK03, T0, scores, val_rows

logger = logging.getLogger("bench.ingest")

FRAME_SIZE = (640, 360)
PERSON_HEIGHT = 160  # pixels: a person some metres from the camera
WALK_FRAMES = 30  # frames a person takes to cross the picture
CAMERA_GAP = timedelta(minutes=3)  # the second camera's clip starts this long after the first's


def background(camera: int, seed: int) -> Image.Image:
    """A camera's scene: a smooth random field over a floor band, its own colours (no data set picture)."""
    rng = np.random.default_rng([seed, camera])
    field = rng.uniform(0, 255, (9, 16, 3)).astype(np.uint8)
    scene = np.asarray(Image.fromarray(field).resize(FRAME_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
    floor = FRAME_SIZE[1] * 2 // 3
    scene[floor:] = scene[floor:] * 0.4 + rng.uniform(60, 140, 3)
    return Image.fromarray(scene.clip(0, 255).astype(np.uint8))


def write_clip(
    folder: Path, people: list[tuple[int, list[Path]]], camera: int, fps: int, gap: int, seed: int
) -> tuple[Path, Path, int]:
    """A video of ``people`` (pid, that camera's shots) entering ``gap`` frames apart, and its MOT file (track =
    pid). The shots change along a walk, as a person turns; (tracks file, video, its frames)."""
    import av  # the ingest extra's decoder, here as an encoder

    scene = background(camera, seed)
    shots = {pid: [Image.open(p).convert("RGB") for p in paths] for pid, paths in people}
    for pid, images in shots.items():
        shots[pid] = [im.resize((max(8, round(im.width * PERSON_HEIGHT / im.height)), PERSON_HEIGHT)) for im in images]
    frames = gap * (len(people) - 1) + WALK_FRAMES
    lines = []
    video = folder / f"camera{camera}.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *FRAME_SIZE, "yuv420p"
        stream.options = {"qscale": "3"}
        for frame in range(1, frames + 1):
            canvas = scene.copy()
            for order, (pid, _) in enumerate(people):
                step = frame - 1 - order * gap
                if not 0 <= step < WALK_FRAMES:
                    continue
                images = shots[pid]
                shot = images[step * len(images) // WALK_FRAMES]
                x = 10 + (FRAME_SIZE[0] - 20 - shot.width) * step // (WALK_FRAMES - 1)
                y = FRAME_SIZE[1] - PERSON_HEIGHT - 20 - 8 * (order % 3)
                canvas.paste(shot, (x, y))
                lines.append(f"{frame},{pid},{x},{y},{shot.width},{shot.height},0.9,-1,-1,-1")
            for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tracks = folder / f"camera{camera}.txt"
    tracks.write_text("\n".join(lines) + "\n")
    return tracks, video, frames


def run(
    weights: Path,
    root: Path,
    max_people: int | None,
    fps: int,
    gap: int,
    best_k: int,
    seed: int,
    join_threshold: float | None = None,
) -> dict:
    rows = val_rows(root)
    by_person: dict[int, dict[int, list[Path]]] = {}
    for path, pid, camid in rows:
        by_person.setdefault(pid, {}).setdefault(camid, []).append(path)
    cameras = sorted({camid for _, _, camid in rows})
    pids = sorted(pid for pid, seen in by_person.items() if len(seen) == len(cameras))[:max_people]
    rng = np.random.default_rng(seed)  # the order people enter in
    truth: dict[tuple[str, str], int] = {}  # (camera, track) -> pid
    entries: dict[int, tuple[str, str]] = {}  # entry id -> (camera, track)

    def record(response: httpx.Response) -> None:
        if response.request.url.path == "/sightings" and response.is_success:
            response.read()
            for tracklet in response.json()["tracklets"]:
                entries.update(dict.fromkeys(tracklet["entries"], (tracklet["camera"], tracklet["track"])))

    out: dict = {"cameras": [], "people": len(pids)}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as work:
        settings = Settings(
            data_dir=Path(work) / "data", weights=weights, device="cpu", backend="torch", allow_unauthenticated=True,
            regroup_interval_s=0, join_threshold=join_threshold,
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            client.event_hooks = {"request": [], "response": [record]}
            for camid in cameras:
                people = [(pid, sorted(by_person[pid][camid])) for pid in rng.permutation(pids).tolist()]
                tracks, video, frames = write_clip(Path(work), people, camid, fps, gap, seed)
                camera = f"camera{camid}"
                truth.update({(camera, str(pid)): pid for pid, _ in people})
                options = Options(camera=camera, start_time=T0 + camid * CAMERA_GAP, best_k=best_k)
                summary = ingest(tracks, video, options, client)
                logger.info(summary.line(camera))
                out["cameras"].append({"camera": camera, "clip_frames": frames, **vars(summary)})

            def labels() -> tuple[list[str], list[int]]:
                got, true = [], []
                while True:
                    page = client.get("/gallery", params={"offset": len(got), "limit": 1000}).json()
                    for item in page["items"]:
                        got.append(item["identity"])
                        true.append(truth[entries[item["id"]]])
                    if not page["items"] or len(got) >= page["total"]:
                        return got, true

            out["online"] = scores(*labels())
            regrouped = client.post("/people/regroup")
            regrouped.raise_for_status()
            out["regrouped"] = scores(*labels())
            out["regroup_s"], out["threshold"] = regrouped.json()["seconds"], regrouped.json()["threshold"]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="the weights file served")
    parser.add_argument("--root", type=Path, default=SHARED_CUHK03, help="CUHK03 with manifest.csv (val split)")
    parser.add_argument("--people", type=int, default=None, help="at most this many people (default: all)")
    parser.add_argument("--fps", type=int, default=10, help="the clips' frame rate")
    parser.add_argument("--gap", type=int, default=6, help="frames between two people entering")
    parser.add_argument("--best-k", type=int, default=5, help="crops sent per track (reid-admin ingest --best-k)")
    parser.add_argument("--seed", type=int, default=0, help="the order people enter in, and the backgrounds")
    parser.add_argument(
        "--join-threshold", type=float, default=None, help="REID_JOIN_THRESHOLD (default: the weights' calibrated one)"
    )
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_weights_and_manifest(parser, args)
    if (args.people is not None and args.people < 1) or args.fps < 1 or args.gap < 1 or args.best_k < 1:
        parser.exit(2, "bench.ingest: --people, --fps, --gap and --best-k must be positive\n")
    results = setup(args)
    started = time.time()
    out = run(args.weights, args.root, args.people, args.fps, args.gap, args.best_k, args.seed, args.join_threshold)
    speed = Table(
        f"reid-admin ingest's pipeline, {args.root.name} val people composited into {FRAME_SIZE[0]}x{FRAME_SIZE[1]} "
        "clips",
        ["camera", "clip frames", "frames decoded", "tracks", "crops", "requests", "seconds", "clip frames/s"],
    )
    for c in out["cameras"]:
        rate = c["clip_frames"] / c["seconds"]
        speed.add(
            c["camera"], c["clip_frames"], c["frames"], c["tracks"], c["crops"], c["requests"], c["seconds"], rate
        )
    grouping = Table(
        "Their tracks grouped into people across the cameras",
        ["step", "pair precision", "pair recall", "BCubed P", "BCubed R", "BCubed F", "people found", "true people"],
    )
    for step in ("online", "regrouped"):
        s = out[step]
        grouping.add(
            step, s["pair_precision"], s["pair_recall"], s["bcubed_precision"], s["bcubed_recall"], s["bcubed_f"],
            s["people"], s["true_people"],
        )  # fmt: skip
    speed.notes.append(
        f"{out['people']} people, each walking across every camera's clip ({WALK_FRAMES} frames) {args.gap} frames "
        f"after the one before, {args.fps} frames/s, MPEG-4 video; the best {args.best_k} crops of a track sent; the "
        "app in this process with its embedding on the CPU: seconds are the whole run, decoding to the last answer "
        "(decoding stops at the last frame a crop is cut from)."
    )
    grouping.notes.append(
        f"Scored per crop against the true identities (pair: over pairs of crops; BCubed: per crop, averaged). "
        f"Join threshold {out['threshold']:.3f}; re-grouping took {out['regroup_s']:.2f} s."
    )
    report("A tracker's output, ingested", "bench.ingest", [speed, grouping], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
