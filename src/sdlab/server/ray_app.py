"""The same app as a Ray Serve deployment: one replica per device, each with its own `create_app`
(its own model, engine and queue of one), so one address serves several GPUs or machines.

    sdlab serve --workers ray [--replicas N] [--ray-address auto]     # the CLI's way
    serve run sdlab.server.ray_app:app_builder replicas=2 models_dir=models   # Ray's own CLI

Every replica takes one request at a time (`max_ongoing_requests=1`): Ray's proxy holds the others
and hands each to the next free replica. What that means for the API: the blocking generation
routes (`/sdapi/v1/txt2img`, `img2img`, `extra-single-image`) and the read-only lists spread over
the replicas; the state a request leaves behind (a job of `/api/v1/jobs`, `progress`, `interrupt`,
`options`, the current model) belongs to the replica that answered it, and a later request may reach
another. Each answer names its replica in the `X-Sdlab-Replica` header.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from typing import Optional

import ray
from ray import serve

from ..errors import InputError
from .app import create_app
from .settings import ServerSettings, parse_api_auth

REPLICA_HEADER = b"x-sdlab-replica"


class ReplicaHeader:
    """ASGI middleware: every HTTP answer carries this replica's name (host:pid), so a client or a
    test can see who served it."""

    def __init__(self, app, name: str):
        self.app = app
        self.name = name.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.name)]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment(max_ongoing_requests=1)
@serve.ingress()
class SdlabReplica:
    """One replica: the settings travel to it, and it builds its app (and loads its model) itself,
    on its own device (Ray sets CUDA_VISIBLE_DEVICES to the GPU it was given)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        reserved = ray.get_runtime_context().get_assigned_resources()
        if not reserved.get("GPU"):
            import torch  # here: the server's modules leave torch to the first generation, for a quick start

            # as many threads as the cores Ray reserved, whatever OMP_NUM_THREADS the worker inherited:
            # replicas sharing a machine do not oversubscribe it, and a replica computes the same sums
            # as any process with that many threads
            torch.set_num_threads(max(1, int(reserved.get("CPU", 1))))
        app = create_app(self.settings)
        app.add_middleware(ReplicaHeader, name=f"{socket.gethostname()}:{os.getpid()}")
        return app


def replica_resources(settings: ServerSettings) -> dict:
    """What Ray reserves for each replica: a whole GPU when the cluster has GPUs and the settings do
    not ask for the CPU, otherwise one CPU core."""
    wants_cpu = settings.device is not None and settings.device.startswith("cpu")
    if not wants_cpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def default_replicas() -> int:
    """One replica per GPU in the cluster, or one when it has none."""
    return max(1, int(ray.cluster_resources().get("GPU", 0)))


def sdlab_app(settings: ServerSettings, replicas: Optional[int] = None, autoscaling: Optional[dict] = None):
    """The Ray Serve application. `replicas` fixes their number (default: one per GPU);
    `autoscaling` (Ray's autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4,
    "target_ongoing_requests": 1}) lets Ray add and remove replicas with the load instead."""
    options = {"ray_actor_options": replica_resources(settings)}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas or default_replicas()
    return SdlabReplica.options(**options).bind(settings)


def settings_from_args(args: dict) -> tuple[ServerSettings, Optional[int]]:
    """`serve run ... key=value` arguments (all strings) -> ServerSettings and the replica count."""
    args = dict(args)
    replicas = int(args.pop("replicas")) if "replicas" in args else None
    fields = {field.name: field for field in dataclasses.fields(ServerSettings)}
    values = {}
    for key, text in args.items():
        if key not in fields:
            raise InputError(f"unknown argument '{key}'; use replicas= or one of: {', '.join(fields)}")
        default = fields[key].default
        if key == "api_auth":
            values[key] = parse_api_auth(text)
        elif key == "cors_allow_origins":
            values[key] = tuple(origin for origin in text.split(",") if origin)
        elif isinstance(default, bool):
            values[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            values[key] = type(default)(text)
        else:
            values[key] = text
    return ServerSettings(**values), replicas


def app_builder(args: dict):
    """The entry point of `serve run sdlab.server.ray_app:app_builder key=value ...`."""
    settings, replicas = settings_from_args(args)
    return sdlab_app(settings, replicas)


def start(settings: ServerSettings, replicas: Optional[int] = None, address: Optional[str] = None) -> str:
    """Connect to Ray (a new local instance, or the cluster at `address`, e.g. "auto" for the one
    `ray start` made on this machine) and deploy; returns the address once the replicas answer. The
    dashboard stays off: it would listen on a port of its own."""
    ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return deploy(settings, replicas)


def deploy(settings: ServerSettings, replicas: Optional[int] = None) -> str:
    """Start Serve's HTTP proxy on settings.host:port and run the replicas on the connected cluster."""
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(sdlab_app(settings, replicas), name="sdlab", route_prefix="/")
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{shown_host}:{settings.port}"


def stop() -> None:
    """Remove the deployment and disconnect; a cluster joined by address keeps running."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def serve_until_interrupted(settings: ServerSettings, replicas: Optional[int], address: Optional[str],
                            announce) -> None:
    """`sdlab serve --workers ray`: deploy, call `announce(url)`, wait for Ctrl-C or SIGTERM, always
    tear down (Ray's own SIGTERM handling would exit without removing the deployment)."""
    try:
        url = start(settings, replicas, address)
        signal.signal(signal.SIGTERM, stop_on_sigterm)  # after ray.init, which installs its own
        announce(url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
