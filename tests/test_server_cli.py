"""`sdlab serve` as a user starts it: the address printed, answers at once, Ctrl-C stops it cleanly."""

import os
import signal
import re
import subprocess
import sys
import threading
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


def test_ctrl_c_while_the_model_still_loads_stops_cleanly():
    """Ctrl-C moments after start-up lands while the worker imports torch and loads the model; the
    interpreter's finalisation used to abort there (SIGABRT) on a busy machine."""
    for delay in (0.2, 0.8, 1.6):
        process = start()
        try:
            address(process)
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0, process.stderr.read()
            assert "stopped" in process.stderr.read()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


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


def test_serve_answers_before_torch_is_imported():
    """The server binds and answers what needs no model before `import torch` (seconds on a busy
    machine): torch comes with the first model, on the worker thread, after the address is printed.
    -X importtime logs each import as it completes, on the same stream as the address, so the order
    of the lines is the order of the events."""
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "sdlab", "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before_address = []
        for line in process.stdout:
            if "serving on http://" in line:
                break
            before_address.append(line)
        else:
            raise AssertionError("sdlab serve ended before printing its address:\n" + "".join(before_address[-20:]))
        url = line.split("serving on ")[1].split()[0]
        threading.Thread(target=process.stdout.read, daemon=True).start()  # the pipe must not fill up
        imported = {match.group(1) for match in map(re.compile(r"^import time:.*\|\s+(\S+)$").match, before_address)
                    if match}
        assert "sdlab.server.app" in imported and "uvicorn" in imported
        assert "torch" not in imported
        progress = wait_until(lambda: _get(f"{url}/sdapi/v1/progress"), 30, "the first answer")
        assert progress.status_code == 200 and "progress" in progress.json()
        assert _get(f"{url}/sdapi/v1/options").status_code == 200
    finally:
        process.kill()
        process.wait(30)


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
