"""A private Prometheus server run from Debian's binary (`scripts/ensure-prometheus.sh` installs it), for
the tests: it scrapes the targets it is given with the metrics token, evaluates the alert rules of
deploy/monitoring, and is asked through its HTTP API, as an operator's Prometheus would be.

It listens on 127.0.0.1 on a port of its own and keeps its data in a directory of the test's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import yaml

ENSURE_SCRIPT = "scripts/ensure-prometheus.sh"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
# Faster than any production setting, so a test sees a change within seconds; not faster, as a
# scrape must end within the interval (its timeout), and the test machine's cores are shared.
SCRAPE_INTERVAL = "2s"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run {ENSURE_SCRIPT} (as root or with sudo)")
    return found


class PrometheusServer:
    def __init__(
        self,
        directory: Path,
        port: int,
        targets: dict[str, list[str]],
        token: str,
        rule_files: list[Path] | None = None,
    ) -> None:
        """`targets`: host:port lists by job name (`conveyor-gateway`, ...), each scraped with `token`."""
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._targets = targets
        self._token = token
        self._rule_files = rule_files or []
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        token_file = self.directory / "metrics-token"
        token_file.write_text(self._token)
        token_file.chmod(0o600)
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(path) for path in self._rule_files],
            "scrape_configs": [
                {
                    "job_name": job,
                    "authorization": {"credentials_file": str(token_file)},
                    "static_configs": [{"targets": targets}],
                }
                for job, targets in self._targets.items()
            ],
        }
        path = self.directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> None:
        config = self._write_config()
        log = (self.directory / "prometheus.log").open("ab")
        self._process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus was not ready in {READY_TIMEOUT_S}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")

    async def api(self, path: str, **params: str) -> Any:
        """`/api/v1/<path>`'s `data`; raises if Prometheus answers with an error."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            response = await client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result: `[{"metric": {...}, "value": [time, "text"]}, ...]`."""
        data = await self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scalar(self, expr: str) -> float:
        """The value of a query that yields one series, or 0 if it yields none."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
