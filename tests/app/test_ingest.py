"""``reid-admin ingest`` against a fake ``POST /sightings`` (an httpx.MockTransport): the crops cut, the boxes
chosen, the JSON aligned with the files, times, resume after a crash, retries, and the operator's errors."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app import admin
from app.ingest import Box, IngestError, Options, ingest, parse_line, select

REPO = Path(__file__).resolve().parents[2]
START = "2024-05-01T12:00:00+02:00"
SIZE = (160, 120)  # frame width, height
COLOURS = {"1": (220, 30, 30), "2": (30, 200, 30), "3": (30, 30, 220)}


# -- fixtures: frames, tracks, a fake service ------------------------------------------------------------------


def boxes_of(frame: int) -> dict[str, tuple[int, int, int, int]]:
    """Where each track is on a frame (x, y, w, h): 1 grows and moves right, 2 walks out on the left edge (clipped,
    then outside from frame 7), 3 is too small (20 px high) for --min-box 32 except on frame 4."""
    boxes = {"1": (10 + 4 * frame, 20, 20 + 2 * frame, 40 + 4 * frame)}
    if frame <= 8:
        boxes["2"] = (60 - 10 * frame, 10, 30, 60)
    boxes["3"] = (120, 80, 16, 36 if frame == 4 else 20)
    return boxes


def draw(frame: int) -> Image.Image:
    image = Image.new("RGB", SIZE, (128, 128, 128))
    for track, (x, y, w, h) in boxes_of(frame).items():
        patch = Image.new("RGB", (w, h), COLOURS[track])
        image.paste(patch, (x, y))  # PIL clips a paste outside the image
    return image


def mot_lines(frames: int, conf: Callable[[str, int], float] = lambda t, f: 0.9) -> list[str]:
    lines = [
        f"{f},{t},{x},{y},{w},{h},{conf(t, f)},-1,-1,-1"
        for f in range(1, frames + 1)
        for t, (x, y, w, h) in boxes_of(f).items()
    ]
    return lines[::-1]  # trackers may write in any order


@pytest.fixture
def sequence(tmp_path: Path) -> tuple[Path, Path]:
    """MOT's layout: seq/img1/000001.jpg ... (PNG, lossless, so colours compare exactly) and the tracks file."""
    img1 = tmp_path / "seq" / "img1"
    img1.mkdir(parents=True)
    for f in range(1, 11):
        draw(f).save(img1 / f"{f:06d}.png")
    tracks = tmp_path / "seq" / "tracks.txt"
    tracks.write_text("\n".join(mot_lines(10)) + "\n")
    return tracks, img1


def parse_multipart(request: httpx.Request) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The request's files (filename, bytes) and text fields."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    files, fields = [], {}
    for part in request.read().split(b"--" + boundary)[1:-1]:
        head, _, body = part.partition(b"\r\n\r\n")
        body = body.removesuffix(b"\r\n")
        disposition = next(line for line in head.decode().split("\r\n") if line.lower().startswith("content-disp"))
        name = disposition.split('name="')[1].split('"')[0]
        if "filename=" in disposition:
            assert name == "files"
            files.append((disposition.split('filename="')[1].split('"')[0], body))
        else:
            fields[name] = body.decode()
    return files, fields


@dataclass
class Sent:
    key: str
    files: list[tuple[str, bytes]]
    sightings: list[dict[str, Any]]


@dataclass
class FakeService:
    """POST /sightings as the service answers it; ``script`` holds answers (or exceptions) to give before 201s."""

    script: list[httpx.Response | Exception] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)  # every POST that reached it, retries included

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ready":
            return httpx.Response(200, json={"ready": True})
        assert request.method == "POST" and request.url.path == "/sightings"
        files, fields = parse_multipart(request)
        sightings = json.loads(fields["sightings"])
        self.sent.append(Sent(request.headers["idempotency-key"], files, sightings))
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        tracklets = [
            {"camera": "cam1", "track": t, "person": f"p-{t}", "entries": [1]}
            for t in sorted({s["track"] for s in sightings})
        ]
        return httpx.Response(201, json={"tracklets": tracklets})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self), base_url="http://reid.test")

    def tracks(self) -> list[str]:
        return [s["track"] for sent in self.sent for s in sent.sightings]


def options(**changes: Any) -> Options:
    return Options(**{"camera": "cam1", "start_time": datetime.fromisoformat(START), "fps": 4.0, **changes})


# -- parsing and choosing ------------------------------------------------------------------------------------


def test_mot_lines_parse_with_extra_columns_and_mot_conventions() -> None:
    assert parse_line("3, 7, 10.5, 20, 30, 60.25, 0.8, -1, -1, -1", "t") == Box(3, "7", 10.5, 20, 30, 60.25, 0.8)
    assert parse_line("3.0,7.0,1,2,3,4,-1", "t") == Box(3, "7", 1, 2, 3, 4, 1.0)  # -1: no confidence given
    assert parse_line("  ", "t") is None
    for bad, why in [
        ("0,1,1,2,3,4,0.5", "frame number"),
        ("1,-1,1,2,3,4,0.5", "detections file"),
        ("1,1,1,2,3,4", "at least 7"),
        ("1,1,1,2,nan,4,0.5", "at least 7"),
    ]:
        with pytest.raises(IngestError, match=why):
            parse_line(bad, "t")


def test_best_k_takes_the_best_quality_apart_in_time() -> None:
    # Quality = area x confidence: frame 10's box is the biggest, 11 nearly as good but its neighbour.
    boxes = [Box(f, "1", 0, 0, 40, 80, 0.5) for f in range(1, 41)]
    boxes[9] = Box(10, "1", 0, 0, 60, 100, 0.9)
    boxes[10] = Box(11, "1", 0, 0, 60, 100, 0.89)
    boxes[29] = Box(30, "1", 0, 0, 50, 90, 0.9)
    boxes[35] = Box(36, "1", 0, 0, 40, 80, 0.3)  # worse than the rest: never chosen
    chosen = select(boxes, (640, 480), best_k=3, min_box=32)
    frames = [p.frame for p in chosen]
    # 11 is too close to 10 while others are left; the third place goes to the earliest of the equal rest.
    assert frames == [1, 10, 30]
    # A short track has no room to spread: simply the best.
    short = [Box(1, "1", 0, 0, 40, 80, 0.5), Box(2, "1", 0, 0, 40, 80, 0.9), Box(3, "1", 0, 0, 40, 80, 0.7)]
    assert [p.frame for p in select(short, (640, 480), best_k=2, min_box=32)] == [2, 3]


def test_boxes_are_clipped_and_small_or_outside_ones_dropped() -> None:
    boxes = [
        Box(1, "1", -10, -5, 40, 80, 1.0),  # partly outside: clipped to 30 x 75
        Box(2, "1", 700, 10, 40, 80, 1.0),  # fully outside the 640 px wide frame
        Box(3, "1", 0, 450, 40, 80, 1.0),  # clipped to 30 px high: under --min-box
    ]
    (pick,) = select(boxes, (640, 480), best_k=5, min_box=32)
    assert (pick.frame, pick.left, pick.top, pick.width, pick.height) == (1, 0, 0, 30, 75)


# -- runs against the fake service ---------------------------------------------------------------------------


def test_folder_crops_json_and_times(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence
    service = FakeService()
    summary = ingest(tracks, img1, options(best_k=3, min_box=32), service.client(), sleep=pytest.fail)
    (request,) = service.sent  # 3 tracks x 3 crops fit one request
    assert len(request.files) == len(request.sightings)
    counts = {t: service.tracks().count(t) for t in "123"}
    assert counts == {"1": 3, "2": 3, "3": 1}  # 3 is high enough on frame 4 only
    start = datetime.fromisoformat(START)
    for (name, data), sighting in zip(request.files, request.sightings, strict=True):
        track, frame = sighting["track"], int(name[-10:-4])
        assert sighting["camera"] == "cam1" and name.startswith(f"{track}-")
        x, y, w, h = boxes_of(frame)[track]
        left, top = max(0, x), max(0, y)
        assert sighting["box"] == [left, top, min(SIZE[0], x + w) - left, min(SIZE[1], y + h) - top]
        crop = Image.open(io.BytesIO(data))
        assert crop.format == "JPEG" and list(crop.size) == sighting["box"][2:]
        centre = crop.convert("RGB").getpixel((crop.width // 2, crop.height // 2))
        assert all(abs(a - b) < 12 for a, b in zip(centre, COLOURS[track], strict=True))  # the track's own pixels
        assert sighting["confidence"] == pytest.approx(0.9)
        assert datetime.fromisoformat(sighting["captured_at"]) == start + timedelta(seconds=(frame - 1) / 4)
        assert sighting["captured_at"].endswith("+02:00")
    # Track 1 grows every frame: its best are the last ones, kept apart (span 9 // 6 = 1 frame).
    assert [int(n[-10:-4]) for n, _ in request.files if n.startswith("1-")] == [6, 8, 10]
    # Track 2 leaves the frame after 6: only frames where some of it is inside.
    assert all(int(n[-10:-4]) <= 6 for n, _ in request.files if n.startswith("2-"))
    assert request.key.startswith("reid-ingest-")
    assert (summary.tracks, summary.crops, summary.requests, summary.frames) == (3, 7, 1, 7)
    state = json.loads((tracks.parent / "tracks.txt.ingest-state.json").read_text())
    assert state["sent"] == {"1": "p-1", "2": "p-2", "3": "p-3"}


def test_requests_hold_at_most_the_tracks_asked_and_go_in_decode_order(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence
    service = FakeService()
    ingest(tracks, img1, options(best_k=2, tracks_per_request=1), service.client())
    # Track 2's two best (whole, equal: the earliest, apart) are on frames 1 and 3, track 3's only one on 4, track
    # 1's last on 10: each request goes once the decoding has passed its tracks.
    assert [sorted({s["track"] for s in sent.sightings}) for sent in service.sent] == [["2"], ["3"], ["1"]]
    assert [[s["captured_at"][11:23] for s in sent.sightings] for sent in service.sent][:2] == [
        ["12:00:00.000", "12:00:00.500"],
        ["12:00:00.750"],
    ]
    assert len({sent.key for sent in service.sent}) == 3
    with pytest.raises(IngestError, match="at most 64"):
        ingest(tracks, img1, options(best_k=5, tracks_per_request=13), service.client())


def test_a_crash_mid_run_resumes_without_the_acknowledged_tracks(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence

    class Crash(Exception):
        pass

    first = FakeService(script=[httpx.Response(201, json={"tracklets": []}), Crash()])
    with pytest.raises(Crash):  # the process dies while the second request is out
        ingest(tracks, img1, options(tracks_per_request=1), first.client())
    state = tracks.parent / "tracks.txt.ingest-state.json"
    assert list(json.loads(state.read_text())["sent"]) == ["3"]
    assert not list(tracks.parent.glob("*.tmp"))  # written whole or not at all
    second = FakeService()
    summary = ingest(tracks, img1, options(tracks_per_request=1), second.client())
    assert sorted(set(second.tracks())) == ["1", "2"] and summary.already_sent == 1
    # The request that was out when it crashed goes again under the same key: the service answers, not enrolls.
    assert second.sent[0].key == first.sent[1].key and second.sent[0].files == first.sent[1].files
    assert sorted(json.loads(state.read_text())["sent"]) == ["1", "2", "3"]
    third = FakeService()
    summary = ingest(tracks, img1, options(tracks_per_request=1), third.client())
    assert third.sent == [] and summary.already_sent == 3 and summary.frames == 0
    # Another tracks file (or camera) under the same state file is refused, not silently skipped.
    tracks.write_text("1,1,10,10,40,80,0.9\n")
    with pytest.raises(IngestError, match="belongs to another run"):
        ingest(tracks, img1, options(), FakeService().client())


def test_503_and_429_are_retried_honouring_retry_after_and_a_lost_answer_under_the_same_key(
    sequence: tuple[Path, Path],
) -> None:
    tracks, img1 = sequence
    busy = httpx.Response(503, headers={"Retry-After": "7"}, json={"detail": "busy", "code": "overloaded"})
    service = FakeService(script=[busy, httpx.Response(429, json={"detail": "slow down"}), httpx.ReadTimeout("lost")])
    slept: list[float] = []
    summary = ingest(tracks, img1, options(), service.client(), sleep=slept.append)
    assert slept == [7.0, 2.0, 4.0]  # Retry-After; then the back-off (1, 2, 4 s ...) where none is given
    assert summary.tracks == 3 and len(service.sent) == 4
    assert len({s.key for s in service.sent}) == 1 and all(s.files == service.sent[0].files for s in service.sent)


def test_another_4xx_stops_with_the_services_words(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence
    refused = httpx.Response(422, json={"detail": "camera name too long", "code": "invalid_camera"})
    service = FakeService(script=[refused])
    with pytest.raises(IngestError, match="422 invalid_camera: camera name too long"):
        ingest(tracks, img1, options(), service.client(), sleep=pytest.fail)
    assert len(service.sent) == 1
    assert not (tracks.parent / "tracks.txt.ingest-state.json").exists()


def test_a_missing_frame_is_named_before_anything_is_sent(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence
    (img1 / "000004.png").unlink()
    service = FakeService()
    with pytest.raises(IngestError, match=r"frame 4 of the tracks has no image in img1/"):
        ingest(tracks, img1, options(best_k=10), service.client())
    assert service.sent == []


def test_folder_rate_from_seqinfo(sequence: tuple[Path, Path]) -> None:
    tracks, img1 = sequence
    (img1.parent / "seqinfo.ini").write_text("[Sequence]\nname=seq\nframeRate=10\nseqLength=10\n")
    service = FakeService()
    ingest(tracks, img1, options(fps=None), service.client())
    times = {s["captured_at"] for sent in service.sent for s in sent.sightings}
    assert "2024-05-01T12:00:00.300000+02:00" in times  # frame 4 (track 3) at 10 frames/s


def run_main(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.set_level(logging.INFO, logger="app.ingest")
    try:
        code = admin.main(["ingest", *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code if isinstance(exc.code, int) else 1
    return code, caplog.text


def test_malformed_line_exits_non_zero_naming_the_line(
    sequence: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    tracks, img1 = sequence
    lines = tracks.read_text().splitlines()
    lines.insert(16, "abc,1,2")
    tracks.write_text("\n".join(lines) + "\n")
    code, text = run_main(
        ["--tracks", str(tracks), "--frames", str(img1), "--camera", "cam1", "--start-time", START], caplog
    )
    assert code == 1
    assert "tracks.txt line 17: expected at least 7 comma-separated numbers, got 'abc,1,2'" in text


def test_unreachable_service_and_missing_start_time_are_sentences(
    sequence: tuple[Path, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracks, img1 = sequence
    argv = ["--tracks", str(tracks), "--frames", str(img1), "--camera", "cam1"]
    code, text = run_main(argv, caplog)
    assert code == 1 and "pass --start-time" in text

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    from app import ingest as module

    real_run = module.run
    monkeypatch.setattr(module, "run", lambda args: real_run(args, transport=httpx.MockTransport(refuse)))
    code, text = run_main([*argv, "--start-time", START, "--url", "http://127.0.0.1:9"], caplog)
    assert code == 1 and "cannot reach the service at http://127.0.0.1:9" in text and "Traceback" not in text


# -- video -----------------------------------------------------------------------------------------------------


def write_video(path: Path, frames: int, rate: int = 10, created: str | None = None) -> None:
    import av

    with av.open(str(path), "w") as container:
        if created:
            container.metadata["creation_time"] = created
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        stream.options = {"qscale": "2"}
        for f in range(1, frames + 1):
            for packet in stream.encode(av.VideoFrame.from_image(draw(f))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_rate_and_creation_time(tmp_path: Path) -> None:
    video = tmp_path / "cam1.mp4"
    write_video(video, 10, rate=10, created="2024-05-01T10:00:00.000000Z")
    tracks = tmp_path / "tracks.txt"
    tracks.write_text("\n".join(mot_lines(10)) + "\n")
    service = FakeService()
    summary = ingest(tracks, video, options(fps=None, start_time=None, best_k=3), service.client())
    assert summary.tracks == 3 and summary.frames == 10  # decoded up to track 1's last crop
    for (name, data), sighting in zip(service.sent[0].files, service.sent[0].sightings, strict=True):
        frame = int(name[-10:-4])
        crop = Image.open(io.BytesIO(data)).convert("RGB")
        assert list(crop.size) == sighting["box"][2:]
        centre = crop.getpixel((crop.width // 2, crop.height // 2))
        assert all(abs(a - b) < 40 for a, b in zip(centre, COLOURS[sighting["track"]], strict=True))
        # The video's own rate (10/s) and creation_time (UTC) time the frames.
        assert sighting["captured_at"] == f"2024-05-01T10:00:00.{frame - 1}00000+00:00"


def test_a_video_shorter_than_the_tracks_and_an_unreadable_one(tmp_path: Path) -> None:
    video = tmp_path / "short.mp4"
    write_video(video, 5)
    tracks = tmp_path / "tracks.txt"
    tracks.write_text("\n".join(mot_lines(10)) + "\n")
    with pytest.raises(IngestError, match="ends at frame 5, but the tracks have boxes up to frame 10"):
        ingest(tracks, video, options(best_k=3, tracks_per_request=1), FakeService().client())
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(IngestError, match="cannot read the video"):
        ingest(tracks, junk, options(), FakeService().client())


# -- the real command ------------------------------------------------------------------------------------------


def test_cli_malformed_line_is_a_sentence_quickly_and_without_torch(tmp_path: Path) -> None:
    tracks = tmp_path / "tracks.txt"
    tracks.write_text("1,1,10,10,40,80,0.9,-1,-1,-1\nabc,1,2\n")
    (tmp_path / "img1").mkdir()
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "app.admin", "ingest", "--tracks", str(tracks), "--frames",
         str(tmp_path / "img1"), "--camera", "cam1", "--start-time", START],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - began
    assert done.returncode == 1
    assert "tracks.txt line 2: expected at least 7 comma-separated numbers, got 'abc,1,2'" in done.stderr
    assert "Traceback" not in done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "app.ingest" in imported and "torch" not in imported and "sqlalchemy" not in imported
    assert took < 10, f"took {took:.1f} s"
