"""A fuzz run against our own OpenAPI schema: schemathesis makes requests for every operation of the
native API (/api/v1) and the web UI's (/sdapi/v1), valid ones and invalid ones, and sends them to a
real uvicorn server on loopback with the bundled model. No answer may be a 5xx, every request gets an
answer, and the server still answers afterwards.

The run is bounded: a few examples per operation and a total time, after which the remaining
operations are left out (the log says how many ran). The server's limits are tight (64 px, 3 steps),
so that the generation requests the fuzzer makes valid stay cheap and the big ones are refused fast.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests

from sdlab.server.settings import ServerSettings
from server_fixtures import LiveServer

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

FUZZED_PREFIXES = ("/sdapi/v1/", "/api/v1/")
EXAMPLES_PER_OPERATION = 25  # per generation mode (valid, invalid)
TOTAL_SECONDS = 150
REQUEST_TIMEOUT = 60  # s: a request that takes longer counts as no answer
LIMITS = ServerSettings(max_size=64, max_steps=3, max_batch=2, max_n_iter=2)


@pytest.fixture(scope="module")
def live():
    with LiveServer(LIMITS) as server:
        yield server


def fuzz_operation(operation, mode: GenerationMode, base_url: str, deadline: float, findings: list,
                   statuses: Counter) -> int:
    """Send up to EXAMPLES_PER_OPERATION requests for `operation`; 5xx answers and requests without an
    answer go to `findings`, every status into `statuses`. Returns how many were sent."""
    sent = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def send(case):
        if time.monotonic() > deadline:
            return
        sent.append(case)
        try:
            response = case.call(base_url=base_url, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as error:
            findings.append(f"{operation.label}: no answer ({error}); {case.as_curl_command()}")
            return
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            findings.append(f"{operation.label}: {response.status_code} {response.text[:300]}; "
                            f"{case.as_curl_command()}")

    try:
        send()
    except Unsatisfiable:  # an operation without parameters has no invalid request to make
        pass
    return len(sent)


def test_no_request_gets_a_5xx_and_the_server_keeps_answering(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    deadline = time.monotonic() + TOTAL_SECONDS
    findings, statuses, operations, requests_sent = [], Counter(), 0, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(FUZZED_PREFIXES):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break
            started, count = time.monotonic(), fuzz_operation(operation, mode, live.url, deadline, findings, statuses)
            print(f"fuzz: {operation.label} {mode.value}: {count} requests in {time.monotonic() - started:.1f} s")
            requests_sent += count
        operations += 1
    print(f"fuzz: {requests_sent} requests to {operations} operations; statuses {dict(sorted(statuses.items()))}")
    assert not findings, "\n".join(findings[:20])
    assert operations >= 30 and requests_sent >= 100, "the fuzz run must reach the routes before its time is up"
    # still serving, and still generating
    assert requests.get(live.url + "/sdapi/v1/samplers", timeout=10).status_code == 200
    answer = requests.post(live.url + "/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64,
                                                                 "steps": 2}, timeout=REQUEST_TIMEOUT)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1
