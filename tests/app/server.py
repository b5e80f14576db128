"""A real ``uvicorn app.main:app`` process on 127.0.0.1 for the tests that need one (crash, load)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``uvicorn app.main:app`` on 127.0.0.1, configured through REID_* variables as in production. Without
    ``weights`` it serves the untrained network it keeps in ``data_dir``; without ``REID_API_KEY`` in ``env`` it
    runs unauthenticated, said explicitly as the service requires. It serves ONNX Runtime in fp32 unless
    ``REID_BACKEND`` says otherwise: ``auto`` calibrates and times every INT8 and OpenVINO candidate at each
    start with crops in the data folder (a replica's restart in test_replicas.py took 25 s with it, its first
    start 6 s), which these tests of the gallery do not look at (``auto`` has its own,
    tests/app/test_reduced_precision.py)."""

    def __init__(self, data_dir: Path, weights: Path | None, log: Path, **env: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
        self.env.update(
            REID_DATA_DIR=str(data_dir),
            REID_DEVICE="cpu",
            REID_BATCH_MAX_WAIT_MS="1",
            REID_BACKEND="onnxruntime",
            REID_LOG_LEVEL="WARNING",
            OMP_NUM_THREADS="1",
        )
        if weights is not None:
            self.env["REID_WEIGHTS"] = str(weights)
        if "REID_API_KEY" not in env:
            self.env["REID_ALLOW_UNAUTHENTICATED"] = "true"
        self.env.update(env)  # e.g. REID_DATABASE_URL
        self.log = log
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=log)
        # /ready is behind the API key when one is set.
        headers = {"X-API-Key": self.env["REID_API_KEY"]} if "REID_API_KEY" in self.env else {}
        for _ in range(1200):  # up to ~2 minutes for torch to import on a busy machine
            if self.process.poll() is not None:
                pytest.fail(f"the service exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the service did not become ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_bytes(self) -> int:
        """The process's resident memory (Linux /proc)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")
