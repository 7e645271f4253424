"""The job queue: first in, first out, one at a time; places, cancelling, interrupting and skipping;
live progress and previews; a client that goes away cancels its queued job; sdlab's own API and
its event stream."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from sdlab.server.app import create_app
from sdlab.server.jobs import CANCELLED, DONE, INTERRUPTED, QUEUED, RUNNING, Changes, Job, JobQueue
from sdlab.server.settings import ServerSettings
from server_fixtures import LiveServer, from_base64, wait_until

LONG = {"prompt": "a red circle", "steps": 150, "width": 64, "height": 64, "preview_every": 1}


class Gate:
    """A fake runner: records the order jobs run in and holds each until released."""

    def __init__(self):
        self.order, self._release = [], {}

    def run(self, job: Job) -> None:
        self.order.append(job.work)
        self._release.setdefault(job.id, threading.Event()).wait(10)

    def release(self, job: Job) -> None:
        self._release.setdefault(job.id, threading.Event()).set()


@pytest.fixture
def gated():
    gate = Gate()
    queue = JobQueue(gate.run)
    queue.start()
    yield gate, queue
    queue.stop()


def test_jobs_run_in_order_and_each_sees_its_place(gated):
    gate, queue = gated
    first, second, third = Job("txt2img", "first"), Job("txt2img", "second"), Job("txt2img", "third")
    assert queue.submit(first) == 0
    wait_until(lambda: first.state == RUNNING, 5, "the first job to run")
    assert (queue.submit(second), queue.submit(third)) == (1, 2)
    assert [queue.position(job) for job in (first, second, third)] == [0, 1, 2]
    gate.release(first)
    wait_until(lambda: second.state == RUNNING, 5, "the second job to run")
    assert first.state == DONE and queue.position(first) is None
    assert [queue.position(job) for job in (second, third)] == [0, 1]
    gate.release(second)
    gate.release(third)
    wait_until(lambda: third.state == DONE, 5, "the last job")
    assert gate.order == ["first", "second", "third"]


def test_cancel_takes_a_waiting_job_off_and_stops_a_running_one(gated):
    gate, queue = gated
    running, waiting, behind = Job("txt2img", "a"), Job("txt2img", "b"), Job("txt2img", "c")
    queue.submit(running)
    wait_until(lambda: running.state == RUNNING, 5, "the job to run")
    queue.submit(waiting)
    queue.submit(behind)
    assert queue.cancel(waiting) == CANCELLED and waiting.done_event.is_set()
    assert queue.position(behind) == 1
    queue.cancel(running)
    assert running.interrupt_requested
    gate.release(running)
    gate.release(behind)
    wait_until(lambda: behind.state == DONE, 5, "the job behind")
    assert gate.order == ["a", "c"]


def test_changes_wake_coroutines_from_another_thread():
    changes = Changes()

    async def waiter():
        seen = changes.version
        threading.Timer(0.05, changes.bump).start()
        started = time.monotonic()
        version = await changes.wait(seen, timeout=5)
        return version, time.monotonic() - started

    version, waited = asyncio.run(waiter())
    assert version == 1 and waited < 2


# -- with the bundled model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerSettings())) as test_client:
        yield test_client


def submit(client, **fields) -> str:
    response = client.post("/api/v1/jobs", json={**LONG, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def status(client, job_id):
    return client.get(f"/api/v1/jobs/{job_id}").json()


def test_progress_shows_steps_and_a_live_preview_and_interrupt_returns_what_it_has(client):
    job_id = submit(client)
    seen = wait_until(lambda: (lambda s: s if s["step"] >= 3 and s["preview"] else None)(status(client, job_id)),
                      60, "steps and a preview")
    assert seen["state"] == "running" and seen["steps"] == 150 and 0 < seen["progress"] < 1
    assert from_base64(seen["preview"]).size == (16, 16)  # approximate: latent resolution
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["sampling_step"] >= 3 and progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1
    assert from_base64(progress["current_image"]).size == (16, 16)
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None

    assert client.post("/sdapi/v1/interrupt").status_code == 200
    final = wait_until(lambda: (lambda s: s if s["state"] not in ("queued", "running") else None)(status(client, job_id)),
                       30, "the interrupted job to end")
    assert final["state"] == "interrupted" and final["step"] < 150
    assert len(final["images"]) == 1 and from_base64(final["images"][0]).size == (64, 64)
    assert "Interrupted at step" in final["infotexts"][0]


def test_full_previews_are_decoded_by_the_vae(client):
    job_id = submit(client, preview="full", steps=40)
    seen = wait_until(lambda: (lambda s: s if s["preview"] else None)(status(client, job_id)), 60, "a preview")
    assert from_base64(seen["preview"]).size == (64, 64)
    assert client.delete(f"/api/v1/jobs/{job_id}").json()["state"] in ("running", "interrupted")
    wait_until(lambda: status(client, job_id)["state"] == "interrupted", 30, "the job to stop")


def test_skip_ends_one_batch_and_the_next_runs(client):
    answers = []
    thread = threading.Thread(target=lambda: answers.append(client.post("/sdapi/v1/txt2img", json={
        "prompt": "a red circle", "steps": 150, "width": 64, "height": 64, "n_iter": 2, "seed": 5})))
    thread.start()
    wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2, 60, "the first batch")
    client.post("/sdapi/v1/skip")
    wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_no"] == 1, 60, "the second batch")
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    info = json.loads(answers[0].json()["info"])
    assert info["all_seeds"] == [5, 6] and info["interrupted"]
    assert all("Interrupted at step" in text for text in info["infotexts"])


def test_event_stream_tells_place_start_progress_and_result(client):
    blocker = submit(client)
    wait_until(lambda: status(client, blocker)["state"] == "running", 60, "the first job to run")
    follower = submit(client, steps=3, preview_every=1)
    events = []
    with client.stream("GET", f"/api/v1/jobs/{follower}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                if name == "queued":
                    client.delete(f"/api/v1/jobs/{blocker}")  # let it through
    names = [name for name, _ in events]
    assert names[0] == "queued" and events[0][1] == {"position": 1}
    assert set(names[names.index("started") + 1:-1]) == {"progress"} and names[-1] == "done"
    steps = [data["step"] for name, data in events if name == "progress"]  # a slow reader may miss some
    assert steps == sorted(set(steps)) and steps[-1] == 3
    assert all(data["preview"] for name, data in events if name == "progress")
    done = events[-1][1]
    assert len(done["images"]) == 1 and len(done["seeds"]) == 1 and not done["interrupted"]
    assert from_base64(done["images"][0]).info["parameters"] == done["infotexts"][0]


def test_native_kinds_and_refusals(client):
    from PIL import Image
    from server_fixtures import to_base64

    image = to_base64(Image.new("RGB", (32, 32), (10, 120, 200)))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    for fields in ({"kind": "img2img", "init_image": image, "strength": 0.5},
                   {"kind": "inpaint", "init_image": image, "mask": to_base64(mask), "fill": "latent noise"},
                   {"kind": "outpaint", "init_image": image, "extend": {"left": 16}}):
        job_id = submit(client, steps=3, width=None, height=None, **fields)
        final = wait_until(lambda: (lambda s: s if s["state"] in ("done", "failed") else None)(status(client, job_id)),
                           60, fields["kind"])
        assert final["state"] == "done", final["error"]
    assert from_base64(final["images"][0]).size == (48, 32)
    for fields, words in (({"kind": "img2img"}, "init_image"), ({"kind": "inpaint", "init_image": image}, "mask"),
                          ({"sampler": "nope"}, "unknown sampler"), ({"model": "../x"}, "refused"),
                          ({"loras": [{"name": "missing"}]}, "LoRA"), ({"kind": "outpaint", "init_image": image}, "extend")):
        response = client.post("/api/v1/jobs", json={**LONG, "width": None, "height": None, **fields})
        assert 400 <= response.status_code < 500 and words in response.json()["detail"], (fields, response.text)
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert client.post("/api/v1/jobs", json={"kind": "paint"}).status_code == 422
    names = {m["name"]: m for m in client.get("/api/v1/models").json()}
    assert names["sdlab-shapes.safetensors"]["current"]
    assert {"name": "karras", "label": "Karras"} in client.get("/api/v1/schedules").json()
    assert client.get("/api/v1/loras").json() == [] and client.get("/api/v1/embeddings").json() == []


# -- clients that go away ---------------------------------------------------------------------------------


def test_a_client_that_disconnects_cancels_its_queued_job():
    with LiveServer(ServerSettings()) as live:
        queue = live.server_state.queue
        blocker = httpx.post(f"{live.url}/api/v1/jobs", json=LONG).json()["id"]
        wait_until(lambda: queue.get(blocker).state == RUNNING, 60, "the first job to run")

        # a web UI request that waits for its answer, then hangs up
        body = json.dumps({"prompt": "a blue square", "steps": 2, "width": 64, "height": 64}).encode()
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as conn:
            conn.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: queue.pending() == 1, 20, "the request to queue")
            waiting = next(job for job in list(queue._jobs.values()) if job.state == QUEUED)
        wait_until(lambda: waiting.state == CANCELLED, 20, "the hung-up request's job to be cancelled")

        # an event stream that is closed while its job waits
        follower = httpx.post(f"{live.url}/api/v1/jobs", json={**LONG, "steps": 2}).json()["id"]
        with httpx.stream("GET", f"{live.url}/api/v1/jobs/{follower}/events", timeout=20) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: queued"):
                    break
        wait_until(lambda: queue.get(follower).state == CANCELLED, 20, "the closed stream's job to be cancelled")
        assert queue.get(blocker).state == RUNNING  # the running job goes on
        httpx.delete(f"{live.url}/api/v1/jobs/{blocker}")
        wait_until(lambda: queue.get(blocker).state == INTERRUPTED, 30, "the first job to stop")


def test_a_model_switch_waits_for_the_running_job(client):
    job_id = submit(client)
    wait_until(lambda: status(client, job_id)["step"] >= 1, 60, "the job to run")
    switched = []
    thread = threading.Thread(target=lambda: switched.append(client.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "sdlab-shapes-inpainting.safetensors"})))
    thread.start()
    time.sleep(0.5)
    assert not switched and status(client, job_id)["state"] == "running"  # the switch waits its turn
    client.delete(f"/api/v1/jobs/{job_id}")
    thread.join(60)
    assert switched[0].status_code == 200 and status(client, job_id)["state"] == "interrupted"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sdlab-shapes-inpainting")
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sdlab-shapes.safetensors"})
