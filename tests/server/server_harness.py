"""A real `python -m server` process on a free 127.0.0.1 port, and /metrics helpers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, artifact: Path, log_dir: Path, *args: str, env: Optional[dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        cmd = [sys.executable, "-m", "server", "--artifact", str(artifact), "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**clean, **(env or {})})

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> "Scrape":
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        return Scrape(response.text)


class Scrape:
    """Samples of one /metrics scrape, parsed by prometheus_client's own parser."""

    def __init__(self, text: str):
        self.families = list(text_string_to_metric_families(text))
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for fam in self.families for s in fam.samples}

    def get(self, name: str, **labels: str) -> float:
        """The sample's value (0.0 when the labelled child does not exist yet); model_name is implied."""
        for (sample, sample_labels), value in self.samples.items():
            given = dict(sample_labels)
            given.pop("model_name", None)
            if sample == name and given == labels:
                return value
        return 0.0


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
