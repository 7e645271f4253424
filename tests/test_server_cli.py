"""`sdlab serve` as a user starts it: the address printed, answers at once, Ctrl-C stops it cleanly."""

import os
import signal
import subprocess
import sys
import time

import httpx

from server_fixtures import wait_until

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def start(*args):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    return subprocess.Popen([sys.executable, "-m", "sdlab", "serve", "--port", "0", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def address(process) -> str:
    line = process.stdout.readline()  # the first line printed is the address
    assert "serving on http://" in line, line
    return line.split("serving on ")[1].split()[0]


def test_serve_prints_the_address_answers_and_stops_on_ctrl_c():
    process = start()
    try:
        url = address(process)
        started = time.monotonic()
        response = wait_until(lambda: _get(f"{url}/sdapi/v1/sd-models"), 30, "the first answer")
        assert response.status_code == 200 and time.monotonic() - started < 10
        assert "sdlab-shapes" in response.json()[0]["title"]
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()


def test_serve_warns_when_listening_beyond_loopback_without_auth():
    process = start("--host", "0.0.0.0")
    try:
        address(process)
        process.send_signal(signal.SIGINT)
        process.wait(30)
        assert "without --api-auth" in process.stderr.read()
    finally:
        process.kill()


def test_serve_refuses_bad_options_in_one_line():
    process = start("--api-auth", "nopassword")
    assert process.wait(60) == 2
    assert process.stderr.read().strip().startswith("sdlab: error: --api-auth takes user:password")


def _get(url):
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
