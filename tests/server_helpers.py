"""Start `sdlab serve` in a subprocess on a free loopback port, wait for it, always stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sdlab serve exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise TimeoutError(f"sdlab serve did not answer {url} within {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Ask the server to stop; kill it when it does not within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 60.0):
    """Yields the base URL (http://127.0.0.1:PORT) of `sdlab serve ARGS`; its output goes to a log
    file whose tail is shown if it fails to start."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "sdlab", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(os.devnull, "wb") as devnull, tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdin=devnull, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_up(url + "/api/v1/samplers", process, timeout)
            except (RuntimeError, TimeoutError) as error:
                log.seek(0)
                raise RuntimeError(f"{error}\n--- server output ---\n{log.read().decode(errors='replace')[-4000:]}")
            yield url
        finally:
            stop(process)

