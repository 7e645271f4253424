"""`sdlab serve`: the HTTP server (the web UI's /sdapi/v1, sdlab's /api/v1, the web page) in one process,
or with `--workers ray` as a Ray Serve deployment with one replica per device (server/ray_app.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading

from ..errors import InputError


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="serve the web page and the HTTP APIs (the web UI's /sdapi/v1 too)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 lets other machines in (use --api-auth then)")
    serve.add_argument("--port", type=int, default=7860, help="port (0: any free one, printed)")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="checkpoints clients may choose by name; LoRAs in DIR/Lora, embeddings in DIR/embeddings")
    serve.add_argument("--model", default=None, metavar="FILE",
                       help="the model loaded first: a file, or a name in --models-dir (default: the bundled model)")
    serve.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER2:PASS2]",
                       help="HTTP Basic authentication on every route and the page")
    serve.add_argument("--max-size", type=int, default=2048, help="largest image side a request may ask for (px)")
    serve.add_argument("--max-batch", type=int, default=8, help="largest batch size")
    serve.add_argument("--max-steps", type=int, default=150, help="most sampling steps")
    serve.add_argument("--cors-allow-origins", nargs="*", default=[], metavar="ORIGIN",
                       help="web origins whose pages may call the API (default: none)")
    serve.add_argument("--outdir", default="outputs", help="where save_images writes (default: outputs)")
    serve.add_argument("--device", default=None, help="cpu, cuda, mps (default: detected)")
    serve.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fastest safe for the device)")
    serve.add_argument("--lowvram", action="store_true",
                       help="keep the networks in CPU memory and move each to the GPU only while it works "
                            "(the peak is the largest network, not all three)")
    serve.add_argument("--prepack", action="store_true",
                       help="CPU, fp32: run every job's UNet on weights reordered once for oneDNN (~1.2x faster steps, "
                            "the same images within fp32 rounding, a second copy of the UNet's weights in memory)")
    serve.add_argument("--workers", choices=("single", "ray"), default="single",
                       help="single: one process (default); ray: a Ray Serve deployment, one replica per device")
    serve.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="with --workers ray: how many replicas (default: one per GPU in the cluster, or 1)")
    serve.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="with --workers ray: the cluster to join ('auto': the one `ray start` made here; "
                            "default: a new local Ray instance)")
    serve.set_defaults(run=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a taken port is one clear line instead of a server that never starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def warn_if_open(settings) -> None:
    from ..server.settings import is_loopback

    if not is_loopback(settings.host) and not settings.api_auth:
        print(f"sdlab: warning: listening on {settings.host} without --api-auth: anyone who can reach this "
              "machine can use the server", file=sys.stderr)


def settings_from_args(args):
    """The server's settings from `sdlab serve`'s arguments (checked)."""
    from ..server.settings import ServerSettings, parse_api_auth

    for name in ("max_size", "max_batch", "max_steps", "replicas"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    return ServerSettings(
        host=args.host, port=args.port, models_dir=args.models_dir, model=args.model,
        api_auth=parse_api_auth(args.api_auth), max_size=args.max_size, max_batch=args.max_batch,
        max_steps=args.max_steps, cors_allow_origins=tuple(args.cors_allow_origins), outputs_dir=args.outdir,
        device=args.device, dtype=args.dtype, lowvram=args.lowvram,
        prepack=args.prepack)


def cmd_serve(args) -> int:
    import uvicorn

    from ..server.app import create_app

    settings = settings_from_args(args)
    if args.workers == "ray":
        return serve_with_ray(settings, args)
    if args.replicas is not None or args.ray_address is not None:
        raise InputError("--replicas and --ray-address need --workers ray")
    app = create_app(settings)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    warn_if_open(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))

    def stop_when_started(signum, frame):
        server.should_exit = True

    # Until uvicorn sets its own handlers, a Ctrl-C raised KeyboardInterrupt wherever Python happened to be,
    # and inside a finaliser that exception is printed and dropped: the server then ran on. This handler
    # asks uvicorn to stop instead (it checks the flag once started); uvicorn restores it when it returns.
    signal.signal(signal.SIGINT, stop_when_started)
    signal.signal(signal.SIGTERM, stop_when_started)
    print(f"sdlab: serving on http://{shown_host}:{port} (API docs at /docs; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    print("sdlab: stopped", file=sys.stderr, flush=True)
    if any(thread.name == "sdlab-worker" and thread.is_alive() for thread in threading.enumerate()):
        # The worker is still inside torch (importing it or loading a model: code an interrupt cannot
        # reach). The interpreter's finalisation would destroy torch's C++ threads under it and abort
        # (SIGABRT, "terminate called without an active exception"). Every file sdlab writes is renamed
        # into place whole, so leaving at once loses nothing half-written.
        sys.stdout.flush()
        os._exit(0)
    return 0


def serve_with_ray(settings, args) -> int:
    try:
        from ..server import ray_app
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "ray":
            raise
        raise InputError("--workers ray needs Ray Serve: pip install 'sdlab[ray]'") from None
    if settings.port == 0:
        # Ray's proxy takes a fixed port: pick a free one now (it is free again once probed)
        probe = bind(settings.host, 0)
        settings = dataclasses.replace(settings, port=probe.getsockname()[1])
        probe.close()
    else:
        bind(settings.host, settings.port).close()  # a taken port is one clear line, before Ray starts
    warn_if_open(settings)

    def announce(url: str) -> None:
        print(f"sdlab: serving on {url} with Ray Serve (API docs at /docs; Ctrl-C stops)", flush=True)

    ray_app.serve_until_interrupted(settings, args.replicas, args.ray_address, announce)
    print("sdlab: stopped", file=sys.stderr)
    return 0
