"""A load test on loopback: `sdlab serve` in a process of its own with the bundled model (64 px, few
steps), ten clients at once sending fifty requests between them.

Every request completes or is refused cleanly (a 4xx or 503 with the web UI's error fields, never a
5xx or a dropped connection); the server process's memory after the run stays within 10% of what it
was after the first request; and an interrupt while jobs queue ends the running job and the queue goes
on with the next ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from server_helpers import SRC, free_port, stop, wait_until_up

CLIENTS, REQUESTS = 10, 50
SMALL = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "sampler_name": "Euler"}
TIMEOUT = 120  # s per request: ten clients queue behind one worker on a busy machine
MEMORY_GROWTH = 0.10


@pytest.fixture(scope="module")
def server():
    """(base URL, psutil.Process) of `sdlab serve` on a free loopback port; stopped afterwards."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "sdlab", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-size", "64", "--max-steps", "60"]
    with open(os.devnull, "wb") as devnull:
        process = subprocess.Popen(command, env=env, stdin=devnull, stdout=devnull, stderr=devnull)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url + "/api/v1/samplers", process, 120)
            yield url, psutil.Process(process.pid)
        finally:
            stop(process)


def txt2img(url: str, seed: int) -> requests.Response:
    return requests.post(url + "/sdapi/v1/txt2img", json={**SMALL, "seed": seed}, timeout=TIMEOUT)


def is_clean(response: requests.Response) -> bool:
    """A finished request: images, or a refusal a client can read."""
    if response.status_code == 200:
        return len(response.json()["images"]) == 1
    return response.status_code in (400, 404, 413, 422, 429, 503) and "detail" in response.json()


def test_ten_clients_fifty_requests_all_answered_and_memory_stays(server):
    url, process = server
    assert txt2img(url, 0).status_code == 200
    after_first = process.memory_info().rss
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as clients:
        answers = list(clients.map(lambda seed: txt2img(url, seed), range(1, REQUESTS + 1)))
    elapsed = time.monotonic() - started
    after_run = process.memory_info().rss
    print(f"load: {REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s; "
          f"server RSS {after_first / 2**20:.0f} MiB after the first, {after_run / 2**20:.0f} MiB after the run")
    assert all(is_clean(answer) for answer in answers), [a.text[:200] for a in answers if not is_clean(a)]
    assert sum(answer.status_code == 200 for answer in answers) == REQUESTS  # nothing here is beyond the limits
    assert after_run <= after_first * (1 + MEMORY_GROWTH), (after_first, after_run)
    assert requests.get(url + "/sdapi/v1/progress", timeout=10).json()["state"]["queue_pending"] == 0


def job_state(url: str, job_id: str) -> dict:
    return requests.get(f"{url}/api/v1/jobs/{job_id}", timeout=10).json()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_an_interrupt_under_load_ends_the_running_job_and_the_queue_goes_on(server):
    url, _ = server
    body = {"prompt": "a blue square", "width": 64, "height": 64, "sampler": "Euler", "seed": 1}
    # a long job to interrupt, then short ones queued behind it
    ids = [requests.post(url + "/api/v1/jobs", json=dict(body, steps=steps), timeout=10).json()["id"]
           for steps in (60, 4, 4)]
    first = ids[0]
    wait_for(lambda: job_state(url, first)["state"] == "running" and job_state(url, first)["step"] >= 2, TIMEOUT,
             "the first job to take its first steps")
    assert requests.post(url + "/sdapi/v1/interrupt", timeout=10).status_code == 200
    stopped = wait_for(lambda: (lambda s: s if s["state"] not in ("queued", "running") else None)(job_state(url, first)),
                       TIMEOUT, "the interrupted job to end")
    assert stopped["state"] == "interrupted" and stopped["step"] < 60 and len(stopped["images"]) == 1
    for job_id in ids[1:]:
        done = wait_for(lambda: (lambda s: s if s["state"] not in ("queued", "running") else None)(job_state(url, job_id)),
                        TIMEOUT, "the queued jobs to run")
        assert done["state"] == "done" and len(done["images"]) == 1 and done["step"] == 4
