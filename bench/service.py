"""The service end to end: ``uvicorn app.main:app`` in its own process on 127.0.0.1, an async HTTP client
(httpx) on loopback. First the inference backends the service can serve with (``app.backends``: eager fp32
PyTorch, ONNX Runtime, and on CUDA autocast + CUDA graphs) at batch 1, 8 and 32, images/s and parity with fp32.
Then latency p50/p95/p99 and throughput of ``POST /query`` at 1 and 16 concurrent clients and of
``POST /gallery`` batches, against the bare call of the servers' own backend on the same crops (in this
process: the ratio is the service's overhead), and dynamic micro-batching (the default
``REID_BATCH_MAX_SIZE``) against one-by-one (``REID_BATCH_MAX_SIZE=1``). Both servers are up at once and
measured turn about, so their ratio is paired within a round.

    python -m bench.service

The client shares the machine with the servers (on 2 cores, it takes some of their CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from PIL import Image

from app.backends import Backend, TorchBackend, check_parity, load_backend
from app.config import Settings
from app.embedder import pick_device
from bench.common import (
    Table,
    add_common_args,
    int_list,
    interleaved_rounds,
    median,
    paired_ratio,
    percentile,
    report,
    setup,
    time_call,
)
from models import ModelConfig, build_eval_transform, build_extractor, load_weights, save_weights

logger = logging.getLogger("bench.service")

DEFAULT_BATCH_MAX_SIZE = Settings.model_fields["batch_max_size"].default


@dataclass
class Server:
    name: str
    batch_max_size: int
    url: str = ""
    process: subprocess.Popen | None = None
    log: Path | None = None
    query: dict[int, list[list[float]]] = field(default_factory=dict)  # clients -> per round, latencies (s)
    query_rate: dict[int, list[float]] = field(default_factory=dict)  # clients -> per round, requests/s
    query_bare: dict[int, list[float]] = field(default_factory=dict)  # clients -> per round, bare forward (s)
    gallery: dict[int, list[float]] = field(default_factory=dict)  # files per request -> latencies (s)
    gallery_bare: dict[int, list[float]] = field(default_factory=dict)  # files -> bare forward before each (s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server: Server, weights: Path, data_dir: Path, args: argparse.Namespace) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "REID_DATA_DIR": str(data_dir),
        "REID_WEIGHTS": str(weights),
        "REID_DEVICE": args.device,
        "REID_BACKEND": args.backend,
        "REID_BATCH_MAX_SIZE": str(server.batch_max_size),
        "REID_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
        "REID_MAX_FILES_PER_REQUEST": str(max(args.gallery_batches)),
        "REID_LOG_LEVEL": "WARNING",
    }
    if args.threads is not None:  # the servers' torch threads as the bench process's
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    server.log = data_dir.with_suffix(".log")
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(server.log, "w") as log:
        server.process = subprocess.Popen([*command, "--log-level", "warning"], env=env, stdout=log, stderr=log)
    server.url = f"http://127.0.0.1:{port}"


def wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    assert server.process is not None and server.log is not None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server {server.name} exited at start-up:\n{server.log.read_text()[-2000:]}")
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server {server.name} not ready after {timeout_s} s:\n{server.log.read_text()[-2000:]}")


def stop_server(server: Server) -> None:
    if server.process is None or server.process.poll() is not None:
        return
    logger.info("stopping %s", server.name)
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def crops(folder: Path, count: int) -> list[bytes]:
    """JPEG person crops in Market-1501's size (128x64), from the project's synthetic generator."""
    from training.data.synthetic import generate_synthetic_market1501

    per_id = 6
    root = generate_synthetic_market1501(folder, num_ids=max(4, -(-count // per_id)), images_per_id=per_id)
    files = sorted(root.rglob("*.jpg"))[:count]
    return [f.read_bytes() for f in files]


# -- the client ------------------------------------------------------------------------------------------------


async def _load(url: str, images: list[bytes], clients: int, requests: int) -> tuple[list[float], float]:
    """``requests`` POST /query from ``clients`` concurrent clients; (latencies in s, requests per second)."""
    latencies: list[float] = []
    queue = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:

        async def worker() -> None:
            for i in queue:
                files = {"file": (f"q{i}.jpg", images[i % len(images)], "image/jpeg")}
                start = time.perf_counter()
                response = await client.post("/query", files=files, data={"top_k": "10"})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"POST /query answered {response.status_code}: {response.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return latencies, requests / wall


def enroll(url: str, images: list[bytes], files_per_request: int, identity: str) -> float:
    """One POST /gallery of ``files_per_request`` crops; seconds."""
    files = [("files", (f"g{i}.jpg", images[i % len(images)], "image/jpeg")) for i in range(files_per_request)]
    start = time.perf_counter()
    response = httpx.post(url + "/gallery", files=files, data={"identity": identity}, timeout=300)
    elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise RuntimeError(f"POST /gallery answered {response.status_code}: {response.text[:300]}")
    return elapsed


# -- the bare extractor --------------------------------------------------------------------------------------


class Bare:
    """The servers' own backend (``app.backends.load_backend`` with the same REID_BACKEND, on the same cached
    ONNX graph) in this process, on already preprocessed tensors; measured right before each service
    measurement it is compared with, so that both see the same load on the machine."""

    def __init__(self, weights: Path, images: list[bytes], device: str, backend: str, cache_dir: Path) -> None:
        self.device = pick_device(device)  # the service's own choice of device
        model = load_weights(weights, self.device)
        self.model = model
        self.fingerprint = model.fingerprint
        self.cache_dir = cache_dir
        self.backend: Backend = load_backend(
            backend, model.extractor, "extractor", model.config, self.fingerprint, cache_dir
        )
        transform = build_eval_transform(model.config)
        self.tensors = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])

    def batch(self, size: int) -> torch.Tensor:
        return self.tensors[torch.arange(size) % len(self.tensors)]

    def forward_seconds(self, batch: int, calls: int) -> float:
        """Median seconds of one backend call at ``batch`` over ``calls`` calls (after one untimed)."""
        x = self.batch(batch)
        self.backend(x)
        return median([time_call(lambda: self.backend(x)) for _ in range(calls)])


def measure_backends(bare: Bare, args: argparse.Namespace) -> Table:
    """Each backend the service could serve with, on the crops, turn about at each batch size."""
    model = bare.model
    backends: dict[str, Backend] = {"eager fp32 (the reference)": TorchBackend(model.extractor, bare.device)}
    for kind in ("onnxruntime", "torch") if bare.device.type == "cuda" else ("onnxruntime",):
        try:
            backend = load_backend(kind, model.extractor, "extractor", model.config, bare.fingerprint, bare.cache_dir)
            backends[backend.name] = backend
        except ValueError as exc:  # not installed or refused: a row saying so
            logger.warning("%s: %s", kind, exc)
            backends[f"{kind} (refused)"] = None  # type: ignore[assignment]
    table = Table(
        "Inference backends (app.backends)",
        [
            "backend",
            "batch",
            "ms per call (median)",
            "images/s",
            "x eager fp32 (paired)",
            "parity: min cosine",
            "rounds",
        ],
    )
    parities = {name: check_parity(model.extractor, b, model.config) for name, b in backends.items() if b is not None}
    for batch in args.backend_batches:
        x = bare.batch(batch)
        calls = {name: (lambda b=b, x=x: b(x)) for name, b in backends.items() if b is not None}
        for call in calls.values():
            call()  # warm-up: arenas, graphs
        times = interleaved_rounds(calls, args.backend_rounds)
        reference = times["eager fp32 (the reference)"]
        for name in backends:
            if name not in calls:
                table.add(name, batch, "refused", None, None, None, None)
                continue
            seconds = median(times[name])
            table.add(
                name,
                batch,
                1e3 * seconds,
                batch / seconds,
                paired_ratio(reference, times[name]),
                min(parities[name].cosines),
                len(times[name]),
            )
    table.notes.append(
        f"{len(bare.tensors)} preprocessed crops cycled into each batch, in this process; parity: the cosine of each "
        "template with fp32 PyTorch on app.backends' fixed batch, the smallest of them (the service refuses a "
        f"backend under 0.999). The servers below serve with REID_BACKEND={args.backend}: {bare.backend.name}."
    )
    return table


# -- main ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", help="extractor of the weights made for the run")
    parser.add_argument("--input-size", default="224x112", help="HxW of the network input (the paper's 224x112)")
    parser.add_argument("--weights", type=Path, default=None, help="a weights file to serve instead (random if unset)")
    parser.add_argument("--device", default="auto", help="REID_DEVICE of the servers and the bare extractor")
    parser.add_argument("--clients", type=int_list, default=[1, 16], help="concurrent clients of POST /query")
    parser.add_argument("--backend", default="auto", help="REID_BACKEND of the servers and of the bare call")
    parser.add_argument(
        "--backend-batches", type=int_list, default=[1, 8, 32], help="batch sizes of the backends table"
    )
    parser.add_argument("--backend-rounds", type=int, default=5, help="interleaved rounds per batch, backends table")
    parser.add_argument(
        "--requests", type=int, default=32, help="POST /query per round and level (at least 2 per client)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each measures both servers at each level")
    parser.add_argument("--gallery-batches", type=int_list, default=[1, 8, 32], help="files per POST /gallery request")
    parser.add_argument("--gallery-requests", type=int, default=2, help="POST /gallery per batch size and server")
    parser.add_argument(
        "--batch-max-size",
        type=int,
        default=DEFAULT_BATCH_MAX_SIZE,
        help="REID_BATCH_MAX_SIZE of the micro-batching server (the service's default, %(default)s)",
    )
    parser.add_argument(
        "--batch-max-wait-ms",
        type=float,
        default=Settings.model_fields["batch_max_wait_ms"].default,
        help="REID_BATCH_MAX_WAIT_MS of both servers (the service's default, %(default)s)",
    )
    parser.add_argument("--images", type=int, default=48, help="distinct crops sent (cycled)")
    parser.add_argument(
        "--bare-calls", type=int, default=3, help="bare extractor calls before each server's turn (median)"
    )
    parser.add_argument("--start-timeout-s", type=float, default=300.0, help="seconds to wait for /ready")
    add_common_args(parser)
    return parser


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so that the servers are stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    signal.signal(signal.SIGTERM, _exit)
    started = time.time()
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    servers = [
        Server(f"micro-batching (max {args.batch_max_size})", args.batch_max_size),
        Server("one-by-one (max 1)", 1),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            config = ModelConfig(backbone=args.backbone, input_height=height, input_width=width)
            weights = save_weights(tmp / "weights.safetensors", build_extractor(config).eval(), None)
        images = crops(tmp / "crops", args.images)
        # The bare call's backend first: its ONNX export (once) is copied to each server's cache.
        bare = Bare(weights, images, args.device, args.backend, tmp / "onnx")
        backends = measure_backends(bare, args)
        try:
            for i, server in enumerate(servers):
                (tmp / f"data{i}").mkdir()
                if (tmp / "onnx").is_dir():
                    shutil.copytree(tmp / "onnx", tmp / f"data{i}" / "onnx")
                start_server(server, weights, tmp / f"data{i}", args)
            for server in servers:
                wait_ready(server, args.start_timeout_s)
            logger.info("servers ready: %s", ", ".join(f"{s.name} at {s.url}" for s in servers))
            _measure(servers, images, bare, args)
        finally:
            for server in servers:
                stop_server(server)
    tables = [backends, *_tables(servers, bare, args, weights)]
    report("Service end to end", "bench.service", tables, started, results, argv)
    return 0


def _measure(servers: list[Server], images: list[bytes], bare: Bare, args: argparse.Namespace) -> None:
    for server in servers:  # warm-up: first requests pay for lazy imports
        asyncio.run(_load(server.url, images, 2, 4))
    for files in args.gallery_batches:
        logger.info("POST /gallery with %d files", files)
        for n in range(args.gallery_requests):
            for server in servers:
                server.gallery_bare.setdefault(files, []).append(bare.forward_seconds(files, 1))
                server.gallery.setdefault(files, []).append(enroll(server.url, images, files, f"id{files}-{n}"))
    for round_ in range(args.rounds):
        for clients in args.clients:
            requests = max(args.requests, 2 * clients)
            for server in servers:
                logger.info("round %d: %s, %d clients, %d requests", round_ + 1, server.name, clients, requests)
                batch = min(clients, server.batch_max_size)
                server.query_bare.setdefault(clients, []).append(bare.forward_seconds(batch, args.bare_calls))
                latencies, rate = asyncio.run(_load(server.url, images, clients, requests))
                server.query.setdefault(clients, []).append(latencies)
                server.query_rate.setdefault(clients, []).append(rate)


def _tables(servers: list[Server], bare: Bare, args: argparse.Namespace, weights: Path) -> list[Table]:
    single = servers[1]
    query = Table(
        "POST /query",
        [
            "server",
            "clients",
            "requests",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "requests/s",
            "x one-by-one (paired)",
            "bare extractor batch",
            "bare ms",
            "p50 / bare",
            "bare images/s",
            "overhead (bare images/s / requests/s)",
        ],
    )
    for clients in args.clients:
        for server in servers:
            latencies = [v for round_ in server.query[clients] for v in round_]
            rates = server.query_rate[clients]
            batch = min(clients, server.batch_max_size)
            bare_rates = [batch / t for t in server.query_bare[clients]]
            query.add(
                server.name,
                clients,
                len(latencies),
                1e3 * percentile(latencies, 50),
                1e3 * percentile(latencies, 95),
                1e3 * percentile(latencies, 99),
                median(rates),
                paired_ratio(rates, single.query_rate[clients]),
                batch,
                1e3 * median(server.query_bare[clients]),
                percentile(latencies, 50) / median(server.query_bare[clients]),
                median(bare_rates),
                paired_ratio(bare_rates, rates),
            )
    query.notes += [
        f"{args.rounds} rounds; in each, both servers serve each client count in turn. Percentiles pool the rounds' "
        "latencies; requests/s is the median over rounds; x one-by-one is the median over rounds of this server's "
        "requests/s / the one-by-one server's in the same round (the micro-batching gain).",
        "One 128x64 JPEG crop per request, top_k 10, over a gallery of the few crops enrolled below (search cost: "
        "see bench.index). bare: one call of the servers' backend in the bench process on preprocessed tensors at "
        "the largest batch the server could form (min(clients, REID_BATCH_MAX_SIZE)), median of "
        f"{args.bare_calls} calls just before the server's turn; p50 / bare: the request's median latency over "
        "the bare call (at 1 client: what the service adds, goal <= 1.10); overhead: median over rounds of bare "
        "images/s / requests/s (1 = none).",
        f"Weights: {weights.name if args.weights else f'random {args.backbone} (models.save_weights)'}; "
        f"REID_BACKEND={args.backend} ({bare.backend.name}); REID_BATCH_MAX_WAIT_MS={args.batch_max_wait_ms}; "
        f"device {bare.device}; torch threads "
        f"{torch.get_num_threads()} in the servers and the bench process.",
    ]
    gallery = Table(
        "POST /gallery (one client, sequential)",
        ["server", "files/request", "requests", "p50 ms", "images/s", "bare ms", "overhead (p50 / bare)"],
    )
    for files in args.gallery_batches:
        for server in servers:
            seconds, bare_s = server.gallery[files], server.gallery_bare[files]
            p50 = percentile(seconds, 50)
            gallery.add(
                server.name,
                files,
                len(seconds),
                1e3 * p50,
                files / p50,
                1e3 * median(bare_s),
                paired_ratio(seconds, bare_s),
            )
    gallery.notes.append(
        "Each request embeds its files in one forward pass (on either server: REID_BATCH_MAX_SIZE bounds the "
        "batching across requests, not within one), stores the crops as PNG, commits the entries and their "
        "change-log rows to SQLite and adds them to the index (snapshots are written in the background); "
        "bare: the backend's call alone at that batch, just before each request; overhead: "
        "the median of request time / bare time."
    )
    return [query, gallery]


if __name__ == "__main__":
    raise SystemExit(main())
