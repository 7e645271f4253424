"""The native API's views of the inside (issue #23 item 10): trajectory, attention and edit jobs on the
bundled model at 64 px and a few steps, through the same job queue as every other job."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sdlab.server.app import create_app
from sdlab.server.settings import ServerSettings
from server_fixtures import from_base64, wait_until

SMALL = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4, "seed": 7, "sampler": "Euler"}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerSettings())) as test_client:
        yield test_client


def run_job(client, **fields) -> dict:
    response = client.post("/api/v1/jobs", json={**SMALL, **fields})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = wait_until(lambda: (lambda job: job if job["state"] not in ("queued", "running") else None)(
        client.get(f"/api/v1/jobs/{job_id}").json()), 300, "the job to finish", every=0.2)
    assert job["state"] == "done", job
    return job


def pixels(text: str) -> np.ndarray:
    return np.asarray(from_base64(text).convert("RGB"), dtype=np.int16)


def test_trajectory_frames_every_n_steps_end_at_the_picture_the_same_seed_makes(client):
    job = run_job(client, kind="trajectory", every=2)
    view = job["inside"]["trajectory"]
    assert job["inside"]["attention"] is None and job["inside"]["edit"] is None
    assert [frame["step"] for frame in view["frames"]] == [0, 2, 4]  # steps 0 and 2, then the finished picture
    assert view["frames"][-1]["sigma"] == 0 and view["frames"][0]["sigma"] > view["frames"][1]["sigma"] > 0
    for frame in view["frames"]:
        assert from_base64(frame["noisy"]).size == from_base64(frame["denoised"]).size == (64, 64)
    grid = from_base64(view["grid"])
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    plain = run_job(client, kind="txt2img")
    assert np.array_equal(pixels(view["frames"][-1]["denoised"]), pixels(plain["images"][0]))
    assert np.array_equal(pixels(job["images"][0]), pixels(plain["images"][0]))
    assert plain["inside"] is None


def test_attention_gives_one_labelled_map_per_word(client):
    job = run_job(client, kind="attention", prompt="a red circle")
    words = job["inside"]["attention"]["words"]
    assert [item["word"] for item in words] == ["a", "red", "circle"]
    maps = [pixels(item["map"]) for item in words]
    assert all(m.shape == (256, 256, 3) for m in maps)
    assert not np.array_equal(maps[1], maps[2]), "each word has its own map"
    assert from_base64(job["inside"]["attention"]["sheet"]).width > 3 * 128
    chosen = run_job(client, kind="attention", prompt="a red circle", words=["circle"])
    assert [item["word"] for item in chosen["inside"]["attention"]["words"]] == ["circle"]


def test_edit_returns_the_source_and_its_edit(client):
    job = run_job(client, kind="edit", target_prompt="a blue circle", cross_steps=0.5)
    view = job["inside"]["edit"]
    assert (view["source_prompt"], view["target_prompt"], view["cross_steps"]) == ("a red circle", "a blue circle", 0.5)
    source, edit = pixels(view["source"]), pixels(view["edit"])
    assert source.shape == edit.shape == (64, 64, 3)
    assert not np.array_equal(source, edit)
    plain = run_job(client, kind="txt2img")
    assert np.abs(source - pixels(plain["images"][0])).max() <= 2, "the source is the picture, redrawn"
    assert len(job["images"]) == 2


def test_the_event_stream_reports_progress_and_the_view(client):
    job_id = client.post("/api/v1/jobs", json={**SMALL, "kind": "trajectory", "every": 3}).json()["id"]
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
        events = [line[len("event: "):] for line in stream.iter_lines() if line.startswith("event: ")]
        done = None
    assert "progress" in events and events[-1] == "done"
    done = client.get(f"/api/v1/jobs/{job_id}").json()
    assert [frame["step"] for frame in done["inside"]["trajectory"]["frames"]] == [0, 3, 4]


def test_a_view_can_be_cancelled_like_any_job(client):
    job_id = client.post("/api/v1/jobs", json={**SMALL, "kind": "attention", "steps": 150}).json()["id"]
    client.delete(f"/api/v1/jobs/{job_id}")
    job = wait_until(lambda: (lambda job: job if job["state"] not in ("queued", "running") else None)(
        client.get(f"/api/v1/jobs/{job_id}").json()), 120, "the job to stop", every=0.2)
    assert job["state"] in ("cancelled", "interrupted") and job["inside"] is None


@pytest.mark.parametrize("fields, status, words", [
    ({"kind": "edit"}, 400, "target_prompt"),
    ({"kind": "edit", "target_prompt": "a blue circle", "sampler": "Euler a"}, 400, "deterministic"),
    ({"kind": "edit", "target_prompt": "a big blue circle"}, 400, "refine"),
    ({"kind": "edit", "target_prompt": "a blue circle", "cross_steps": 1.5}, 422, "cross_steps"),
    ({"kind": "edit", "target_prompt": "a blue circle", "reweight": {"square": 2}}, 400, "square"),
    ({"kind": "attention", "words": ["square"]}, 400, "square"),
    ({"kind": "attention", "prompt": ""}, 400, "words"),
    ({"kind": "trajectory", "every": 0}, 422, "every"),
    ({"kind": "trajectory", "batch_size": 2}, 400, "batch_size"),
    ({"kind": "trajectory", "target_prompt": "a blue circle"}, 400, "target_prompt"),
    ({"kind": "txt2img", "every": 2}, 400, "every"),
    ({"kind": "attention", "strength": 0.5}, 400, "strength"),
    ({"kind": "trajectory", "init_image": "iVBORw0KGgo="}, 400, "init_image"),
    ({"kind": "trajectory", "steps": 100000}, 400, "steps"),
    ({"kind": "inside"}, 422, "kind"),
])
def test_bad_input_is_4xx_with_a_message(client, fields, status, words):
    response = client.post("/api/v1/jobs", json={**SMALL, **fields})
    assert response.status_code == status, response.text
    assert words in json.dumps(response.json()), response.text


def test_openapi_documents_the_views(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"InsideView", "TrajectoryView", "AttentionView", "EditView", "WordMap"} <= set(schema)
    assert {"trajectory", "attention", "edit"} <= set(schema["JobRequest"]["properties"]["kind"]["enum"])
