"""Helpers of the server tests: a real uvicorn server on a free loopback port in a thread, images as
base64, and bounded waits (every loop here gives up after a timeout instead of hanging CI)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import uvicorn
from PIL import Image

from sdlab.server.app import create_app
from sdlab.server.settings import ServerSettings


class LiveServer:
    """create_app(settings) served by uvicorn on 127.0.0.1 (a free port) until close()."""

    def __init__(self, settings: ServerSettings = ServerSettings(), timeout: float = 60.0):
        self.app = create_app(settings)
        self.server_state = self.app.state.server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        wait_until(lambda: self._uvicorn.started, timeout, "the server to start")

    def close(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_until(condition, timeout: float, what: str, every: float = 0.05):
    """Poll `condition()` until it is truthy (returned) or `timeout` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def to_base64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def from_base64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
