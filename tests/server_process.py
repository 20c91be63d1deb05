"""Driving a real `tuili serve` subprocess from tests: start it, read /metrics, stream."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import MODEL

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[1]


class TuiliProcess:
    """`python -m tuili COMMAND ... --port P` on a free port, returned once /health answers."""

    def __init__(self, tmp: Path, command: list[str], timeout: float = 180,
                 env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"{command[0]}-{self.port}.log"
        env = {**os.environ, **(env or {}),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        with self.log_path.open("w") as log:  # the child keeps its own copy of the file
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tuili", *command, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{command[0]} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class Server(TuiliProcess):
    """A `tuili serve` subprocess of the test model."""

    def __init__(self, tmp: Path, *flags: str):
        super().__init__(tmp, ["serve", "--model", MODEL, *flags])


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Streamer(threading.Thread):
    """A streaming client in a thread: reads until told to stop, then drops the connection."""

    def __init__(self, server, body: dict):
        super().__init__(daemon=True)
        self.server, self.body = server, body
        self.chunks, self.status, self.stop_now = 0, None, threading.Event()
        self.lines: list[str] = []

    def run(self) -> None:
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", f"{self.server.url}/v1/completions", json=self.body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.chunks += 1
                    if self.stop_now.is_set():
                        return  # closes the connection mid-stream


def accepts_connections(s: Server) -> bool:
    try:
        httpx.get(f"{s.url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


class StandInLLM:
    """Just enough of AsyncLLM for the app to run in-process (tests of the server's own code);
    subclasses give generate() and whatever else they need."""
    max_model_len, vocab_size, unstarted_sequences, unstarted_tokens = 64, 100, 0, 0
    tokenizer, task = None, "generate"

    def __init__(self):
        from tuili.async_llm import EngineStats

        self.stats = EngineStats()

    def default_sampling_params(self, **given):
        from tuili import SamplingParams

        return SamplingParams(**{k: v for k, v in given.items() if v is not None})

    def check_params(self, params) -> None:
        pass

    async def run_in_worker(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def min_prompt_tokens(self, text: str) -> int:
        return 0

    def shutdown(self) -> None:
        pass
