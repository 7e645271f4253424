"""The app as a Ray Serve deployment: a local Ray instance with two CPU replicas serves four
concurrent txt2img requests, both replicas take work, and every image equals the single-process
server's for the same seed (bundled model, 64 px, 4 steps).

Ray's startup is slow on a small machine, hence `slow`; every wait is bounded and Ray is always
shut down.
"""

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import httpx
import ray

from sdlab.cli import main  # noqa: E402
from sdlab.errors import InputError  # noqa: E402
from sdlab.server import ray_app  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from server_fixtures import from_base64  # noqa: E402

SEEDS = (1, 2, 3, 4)
STARTUP_SECONDS = 150  # Ray, Serve and two replicas loading the model, on a busy 2-core machine
REQUEST = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 4, "sampler_name": "Euler"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pixels(answer: dict) -> np.ndarray:
    return np.asarray(from_base64(answer["images"][0]).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def single_process_answers():
    """This process's answers with one thread, as each replica computes on the one core Ray gives it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return answers_of(create_app(ServerSettings(device="cpu")))
    finally:
        torch.set_num_threads(threads)


def answers_of(app) -> dict:
    with TestClient(app) as client:
        answers = {}
        for seed in SEEDS:
            response = client.post("/sdapi/v1/txt2img", json={**REQUEST, "seed": seed})
            assert response.status_code == 200, response.text
            answers[seed] = response.json()
        return answers


@pytest.fixture(scope="module")
def ray_server():
    settings = ServerSettings(host="127.0.0.1", port=free_port(), device="cpu")
    # a fresh local instance; its worker processes inherit this environment (PYTHONPATH included)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    waiter = ThreadPoolExecutor(1)  # serve.run itself waits without a limit
    try:
        yield waiter.submit(ray_app.deploy, settings, 2).result(timeout=STARTUP_SECONDS)
    finally:
        ray_app.stop()
        waiter.shutdown(wait=False)


@pytest.mark.slow
def test_two_replicas_share_the_work_and_match_the_single_process_server(ray_server, single_process_answers):
    def generate(seed):
        response = httpx.post(ray_server + "/sdapi/v1/txt2img", json={**REQUEST, "seed": seed}, timeout=120)
        assert response.status_code == 200, response.text
        return seed, response.headers["x-sdlab-replica"], response.json()

    with ThreadPoolExecutor(len(SEEDS)) as pool:
        results = list(pool.map(generate, SEEDS))

    replicas = {replica for _, replica, _ in results}
    assert len(replicas) == 2, f"one replica served everything: {replicas}"
    for seed, _, answer in results:
        expected = single_process_answers[seed]
        assert json.loads(answer["info"])["infotexts"] == json.loads(expected["info"])["infotexts"]
        assert np.array_equal(pixels(answer), pixels(expected)), f"seed {seed} differs"


def test_serve_run_arguments_become_settings():
    settings, replicas = ray_app.settings_from_args(
        {"replicas": "3", "models_dir": "models", "max_steps": "20", "max_cfg": "12.5", "api_auth": "a:b",
         "cors_allow_origins": "http://x,http://y", "load_model_at_start": "false"})
    assert replicas == 3 and settings.models_dir == "models" and settings.max_steps == 20
    assert settings.max_cfg == 12.5 and settings.api_auth == (("a", "b"),)
    assert settings.cors_allow_origins == ("http://x", "http://y") and settings.load_model_at_start is False
    with pytest.raises(InputError, match="unknown argument 'modelsdir'"):
        ray_app.settings_from_args({"modelsdir": "models"})


def test_ray_options_need_workers_ray(capsys):
    assert main(["serve", "--replicas", "2"]) == 2
    assert "--workers ray" in capsys.readouterr().err
