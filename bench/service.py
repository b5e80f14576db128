"""The service end to end: ``uvicorn app.main:app`` in its own process on 127.0.0.1, an async HTTP client
(httpx) on loopback. First the inference backends the service can serve with (``app.backends``: eager fp32
PyTorch, ONNX Runtime fp32 and INT8, OpenVINO fp32, bf16 and INT8, and on CUDA autocast + CUDA graphs), for the
extractor and the mask generator, at batch 1, 8 and 32: images/s, paired ratios to eager fp32 and to ONNX
Runtime fp32, and the parity check's figures. Then latency p50/p95/p99 and throughput of ``POST /query`` at 1
and 16 concurrent clients and of ``POST /gallery`` batches, against the bare call of each server's own backend on
the same crops (in this process: the ratio is the service's overhead), for three servers measured turn about:
``--backend`` with micro-batching, the fp32 baseline (``--baseline-backend``) with micro-batching, and
``--backend`` one by one (``REID_BATCH_MAX_SIZE=1``).

    python -m bench.service
    python -m bench.service --weights model.safetensors --crops ../shared/data/cuhk03-detected/val

Calibration and the parity check read ``--crops`` (default: synthetic crops from the project's generator).

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
from typing import Any

import httpx
import torch
from PIL import Image

from app.backends import (
    KINDS,
    MIN_COSINE,
    MIN_COSINE_REDUCED,
    MIN_NN_AGREEMENT,
    REDUCED_KINDS,
    Backend,
    BackendError,
    ReferenceCrops,
    TorchBackend,
    check_parity,
    reference_crops,
    select_backend,
)
from app.backends.crops import MASK_CHECK_CROPS
from app.backends.select import build
from app.config import Settings
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
from models import (
    ModelConfig,
    build_eval_transform,
    build_extractor,
    build_mask_generator,
    extractor_fingerprint,
    load_weights,
    save_weights,
)
from models.devices import resolve_device

logger = logging.getLogger("bench.service")

DEFAULT_BATCH_MAX_SIZE = Settings.model_fields["batch_max_size"].default


@dataclass
class Server:
    name: str
    batch_max_size: int
    backend: str  # its REID_BACKEND
    url: str = ""
    serving: str = ""  # the kind it chose (/health), whose bare call it is compared with
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


def start_server(server: Server, weights: Path, data_dir: Path, crops_dir: Path, args: argparse.Namespace) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "REID_DATA_DIR": str(data_dir),
        "REID_WEIGHTS": str(weights),
        "REID_DEVICE": args.device,
        "REID_BACKEND": server.backend,
        "REID_CALIBRATION_DIR": str(crops_dir),
        "REID_BATCH_MAX_SIZE": str(server.batch_max_size),
        "REID_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
        "REID_MAX_FILES_PER_REQUEST": str(max(args.gallery_batches)),
        "REID_LOG_LEVEL": "WARNING",
        "REID_ALLOW_UNAUTHENTICATED": "true",  # on loopback, for the bench's clients alone
    }
    env.pop("REID_API_KEY", None)
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
                server.serving = httpx.get(server.url + "/health", timeout=5).json()["backends"]["extractor"]["kind"]
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
    files = sorted(synthetic_crops(folder, count).rglob("*.jpg"))[:count]
    return [f.read_bytes() for f in files]


def synthetic_crops(folder: Path, count: int) -> Path:
    """A folder of at least ``count`` synthetic JPEG crops (the project's Market-1501 generator)."""
    from training.data.synthetic import generate_synthetic_market1501

    per_id = 6
    return generate_synthetic_market1501(folder, num_ids=max(4, -(-count // per_id)), images_per_id=per_id)


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


def enroll(client: httpx.Client, images: list[bytes], files_per_request: int, identity: str) -> float:
    """One POST /gallery of ``files_per_request`` crops on a kept-alive connection (``httpx.post`` would build a
    client, with its SSL context, inside the time measured); seconds."""
    files = [("files", (f"g{i}.jpg", images[i % len(images)], "image/jpeg")) for i in range(files_per_request)]
    start = time.perf_counter()
    response = client.post("/gallery", files=files, data={"identity": identity}, timeout=300)
    elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise RuntimeError(f"POST /gallery answered {response.status_code}: {response.text[:300]}")
    return elapsed


# -- the bare extractor --------------------------------------------------------------------------------------


class Bare:
    """The servers' backends (``app.backends.select_backend`` of each kind a server serves, on the same cached
    graphs) in this process, on already preprocessed tensors; measured right before each service measurement it
    is compared with, so that both see the same load on the machine."""

    def __init__(self, weights: Path, images: list[bytes], device: str, crops: ReferenceCrops, cache_dir: Path) -> None:
        self.device = resolve_device(device)  # the service's own choice of device
        self.model = load_weights(weights, self.device)
        self.crops = crops
        self.cache_dir = cache_dir
        self.selections: dict[tuple[str, str], Any] = {}  # (role, kind) -> Selection, or the refusal's text
        transform = build_eval_transform(self.model.config)
        self.tensors = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])

    def network(self, role: str) -> tuple[torch.nn.Module, str]:
        if role == "extractor":
            return self.model.extractor, self.model.fingerprint
        assert self.model.mask_generator is not None
        return self.model.mask_generator, extractor_fingerprint(
            self.model.config, self.model.mask_generator.state_dict()
        )

    def select(self, kind: str, role: str = "extractor") -> Any:
        """The Selection of ``kind`` for ``role`` (what the service would serve), or why it was refused."""
        if (role, kind) not in self.selections:
            module, fingerprint = self.network(role)
            try:
                self.selections[role, kind] = select_backend(
                    kind, module, role, self.model.config, fingerprint, self.cache_dir, crops=self.crops
                )
            except (BackendError, ValueError) as exc:  # not installed, or refused: a row saying so
                logger.warning("%s %s: %s", role, kind, exc)
                self.selections[role, kind] = str(exc)
        return self.selections[role, kind]

    def backend(self, kind: str) -> Backend:
        selection = self.select(kind)
        if isinstance(selection, str):
            raise RuntimeError(f"the servers serve {kind}, which this process cannot build: {selection}")
        return selection.backend

    def batch(self, size: int) -> torch.Tensor:
        return self.tensors[torch.arange(size) % len(self.tensors)]

    def forward_seconds(self, kind: str, batch: int, calls: int) -> float:
        """Median seconds of one call of ``kind``'s backend at ``batch`` over ``calls`` calls (after one untimed)."""
        backend, x = self.backend(kind), self.batch(batch)
        backend(x)
        return median([time_call(lambda: backend(x)) for _ in range(calls)])


REFERENCE = "eager fp32 (the reference)"


def measure_backends(bare: Bare, role: str, kinds: list[str], args: argparse.Namespace) -> Table:
    """Each backend kind the service could serve ``role`` with, on the crops, turn about at each batch size. A kind
    the parity check refuses is timed too (its row says so): what it would have cost is part of the answer."""
    module, fingerprint = bare.network(role)
    config = bare.model.config
    backends: dict[str, Backend | None] = {REFERENCE: TorchBackend(module, bare.device)}
    parity: dict[str, str] = {REFERENCE: ""}
    reduced_bar = {True: MIN_COSINE_REDUCED, False: MIN_COSINE}
    for kind in kinds:
        try:
            backend = build(kind, module, role, config, fingerprint, bare.cache_dir, bare.crops)
        except (BackendError, ValueError) as exc:  # not installed, not buildable here: a row saying so
            logger.warning("%s %s: %s", role, kind, exc)
            backends[kind], parity[kind] = None, f"not built: {str(exc)[:160]}"
            continue
        inputs = bare.crops.check if role == "extractor" else bare.crops.check[:MASK_CHECK_CROPS]
        p = check_parity(
            module, backend, inputs, min_cosine=reduced_bar[kind in REDUCED_KINDS],
            templates=role == "extractor", check_set=bare.crops.source,
        )  # fmt: skip
        backends[kind] = backend
        parity[kind] = f"{'passes' if p.ok else 'REFUSED'}: min cos {min(p.cosines):.4f}" + (
            "" if p.nn_agreement is None else f", same NN {100 * p.nn_agreement:.1f}%"
        )
    table = Table(
        f"Inference backends (app.backends): the {role.replace('_', ' ')}",
        ["backend", "kind", "batch", "ms per call (median)", "images/s", "x eager fp32 (paired)",
         "x onnxruntime fp32 (paired)", "parity", "rounds"],
    )  # fmt: skip
    for batch in args.backend_batches:
        x = bare.batch(batch)
        calls = {name: (lambda b=b, x=x: b(x)) for name, b in backends.items() if b is not None}
        for call in calls.values():
            call()  # warm-up: arenas, graphs
        times = interleaved_rounds(calls, args.backend_rounds)
        reference = times[REFERENCE]
        for name, backend in backends.items():
            label = backend.name if backend is not None else name
            if name not in calls:
                table.add(label, name, batch, None, None, None, None, parity[name], None)
                continue
            seconds = median(times[name])
            onnx = paired_ratio(times["onnxruntime"], times[name]) if "onnxruntime" in times else None
            table.add(
                label, "torch" if name == REFERENCE else name, batch, 1e3 * seconds, batch / seconds,
                paired_ratio(reference, times[name]), onnx, parity[name], len(times[name]),
            )  # fmt: skip
    table.notes.append(
        f"{len(bare.tensors)} preprocessed crops cycled into each batch, in this process; each kind built as "
        "app.backends builds it for the service (graphs exported and quantised once, cached by fingerprint) and "
        f"checked on {bare.crops.source}: min cosine with fp32 PyTorch over the check set (fp32 kinds need >= "
        f"{MIN_COSINE}, bf16 and INT8 >= {MIN_COSINE_REDUCED}) and, for templates, the share of check crops with the "
        f"same nearest neighbour (>= {100 * MIN_NN_AGREEMENT:g}%); REFUSED: the service would not serve it. x "
        "columns: the median over rounds of the other's time / this one's (> 1: this one is faster)."
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
    parser.add_argument("--backend", default="auto", help="REID_BACKEND of the servers measured (and their bare call)")
    parser.add_argument(
        "--baseline-backend",
        default="onnxruntime",
        help="REID_BACKEND of the fp32 server measured in the same run (empty: none)",
    )
    parser.add_argument(
        "--kinds",
        type=lambda t: [v for v in t.split(",") if v],
        default=[k for k in KINDS if k != "torch"],
        help="backend kinds of the backends tables (default: every CPU kind)",
    )
    parser.add_argument("--unet-width", type=int, default=64, help="U-Net base width of the weights made for the run")
    parser.add_argument(
        "--crops", type=Path, default=None, help="real crops for calibration and the parity check (default: synthetic)"
    )
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crops is not None and not args.crops.is_dir():
        parser.exit(2, f"bench.service: --crops {args.crops} is not a folder\n")
    results = setup(args)
    signal.signal(signal.SIGTERM, _exit)
    started = time.time()
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    servers = [Server(f"micro-batching (max {args.batch_max_size}), {args.backend}", args.batch_max_size, args.backend)]
    if args.baseline_backend:
        servers.append(
            Server(f"micro-batching (max {args.batch_max_size}), {args.baseline_backend}", args.batch_max_size,
                   args.baseline_backend)
        )  # fmt: skip
    servers.append(Server(f"one-by-one (max 1), {args.backend}", 1, args.backend))
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            config = ModelConfig(
                backbone=args.backbone, input_height=height, input_width=width, unet_base_width=args.unet_width
            )
            extractor, mask = build_extractor(config).eval(), build_mask_generator(config).eval()
            weights = save_weights(tmp / "weights.safetensors", extractor, mask)
        images = crops(tmp / "crops", args.images)
        crops_dir = args.crops or synthetic_crops(tmp / "calibration", 200)
        reference = reference_crops(crops_dir, load_weights(weights).config)
        if reference is None:
            parser.exit(2, f"bench.service: {crops_dir} holds too few readable crops for a check set\n")
        # The bare calls' backends first: their graphs (exported and quantised once) are copied to each server.
        bare = Bare(weights, images, args.device, reference, tmp / "onnx")
        tables = [measure_backends(bare, "extractor", args.kinds, args)]
        if bare.model.mask_generator is not None:
            tables.append(measure_backends(bare, "mask_generator", args.kinds, args))
        try:
            for i, server in enumerate(servers):  # one at a time: each times its candidates on a quiet machine
                (tmp / f"data{i}").mkdir()
                if (tmp / "onnx").is_dir():
                    shutil.copytree(tmp / "onnx", tmp / f"data{i}" / "onnx")
                start_server(server, weights, tmp / f"data{i}", crops_dir, args)
                wait_ready(server, args.start_timeout_s)
                logger.info("%s ready at %s, serving %s", server.name, server.url, server.serving)
            _measure(servers, images, bare, args)
        finally:
            for server in servers:
                stop_server(server)
    tables += _tables(servers, bare, args, weights)
    report("Service end to end", "bench.service", tables, started, results, argv)
    return 0


def _measure(servers: list[Server], images: list[bytes], bare: Bare, args: argparse.Namespace) -> None:
    for server in servers:  # warm-up: first requests pay for lazy imports
        asyncio.run(_load(server.url, images, 2, 4))
    clients = {server.url: httpx.Client(base_url=server.url) for server in servers}
    for files in args.gallery_batches:
        logger.info("POST /gallery with %d files", files)
        for n in range(args.gallery_requests):
            for server in servers:
                server.gallery_bare.setdefault(files, []).append(bare.forward_seconds(server.serving, files, 1))
                took = enroll(clients[server.url], images, files, f"id{files}-{n}")
                server.gallery.setdefault(files, []).append(took)
    for client in clients.values():
        client.close()
    for round_ in range(args.rounds):
        for clients in args.clients:
            requests = max(args.requests, 2 * clients)
            for server in servers:
                logger.info("round %d: %s, %d clients, %d requests", round_ + 1, server.name, clients, requests)
                batch = min(clients, server.batch_max_size)
                server.query_bare.setdefault(clients, []).append(
                    bare.forward_seconds(server.serving, batch, args.bare_calls)
                )
                latencies, rate = asyncio.run(_load(server.url, images, clients, requests))
                server.query.setdefault(clients, []).append(latencies)
                server.query_rate.setdefault(clients, []).append(rate)


def _tables(servers: list[Server], bare: Bare, args: argparse.Namespace, weights: Path) -> list[Table]:
    single = servers[-1]
    baseline = servers[1] if args.baseline_backend else None
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
            "x fp32 server (paired)",
            "serving",
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
                paired_ratio(rates, baseline.query_rate[clients]) if baseline else None,
                bare.backend(server.serving).name,
                batch,
                1e3 * median(server.query_bare[clients]),
                percentile(latencies, 50) / median(server.query_bare[clients]),
                median(bare_rates),
                paired_ratio(bare_rates, rates),
            )
    query.notes += [
        f"{args.rounds} rounds; in each, every server serves each client count in turn. Percentiles pool the rounds' "
        "latencies; requests/s is the median over rounds; x one-by-one is the median over rounds of this server's "
        "requests/s / the one-by-one server's in the same round (the micro-batching gain); x fp32 server: the same "
        f"against the server on REID_BACKEND={args.baseline_backend or '(none)'}. serving: the backend each server "
        "chose (its /health), whose bare call it is compared with.",
        "One 128x64 JPEG crop per request, top_k 10, over a gallery of the few crops enrolled below (search cost: "
        "see bench.index). bare: one call of the servers' backend in the bench process on preprocessed tensors at "
        "the largest batch the server could form (min(clients, REID_BATCH_MAX_SIZE)), median of "
        f"{args.bare_calls} calls just before the server's turn; p50 / bare: the request's median latency over "
        "the bare call (at 1 client: what the service adds, goal <= 1.10); overhead: median over rounds of bare "
        "images/s / requests/s (1 = none).",
        f"Weights: {weights.name if args.weights else f'random {args.backbone} (models.save_weights)'}; "
        f"REID_BACKEND={args.backend}; REID_BATCH_MAX_WAIT_MS={args.batch_max_wait_ms}; "
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
