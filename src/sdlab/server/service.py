"""One server's state: its settings, models folder, engine, job queue and web UI settings. The app
factory builds one per app and keeps it on `app.state.server`; nothing lives at module level, so a
test, a second app or a Ray replica builds its own.
"""

from __future__ import annotations

from typing import Optional

from fastapi import Request

from .engine import Engine, LoadWork
from .http import ApiError
from .jobs import FINISHED, QUEUED, Job, JobQueue
from .model_folder import ModelFolder
from .settings import ServerSettings
from .webui_options import WebUIOptions

DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting request checks whether its client has gone


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.folder = ModelFolder(settings.models_dir, settings.model)
        self.engine = Engine(settings, self.folder)
        self.queue = JobQueue(self.engine.run, settings.finished_jobs_kept)
        self.options = WebUIOptions()

    def start(self) -> None:
        """Start the worker; the first model loads as the first job, so the server answers at once."""
        self.queue.start()
        if self.settings.load_model_at_start:
            self.queue.submit(Job("load", LoadWork()))

    def stop(self) -> None:
        self.queue.stop()

    def submit(self, kind: str, work) -> Job:
        job = Job(kind, work)
        try:
            self.queue.submit(job)
        except RuntimeError as exc:
            raise ApiError(503, "ServiceUnavailable", str(exc)) from None
        return job

    async def wait(self, job: Job, request: Optional[Request] = None) -> Job:
        """Wait until `job` finishes. When `request`'s client goes away while the job still waits in
        the queue, the job is cancelled: nobody is left to take its result."""
        seen = job.changes.version
        while job.state not in FINISHED:
            seen = await job.changes.wait(seen, DISCONNECT_POLL_SECONDS)
            if request is not None and job.state == QUEUED and await request.is_disconnected():
                self.queue.cancel(job)
        return job

    async def run(self, kind: str, work, request: Optional[Request] = None) -> Job:
        """Queue `work`, wait for it, and raise its error as the answer (ApiError) when it failed."""
        job = await self.wait(self.submit(kind, work), request)
        if job.error:
            raise ApiError(job.error_status, job.error_type, job.error)
        return job

    async def switch_model(self, name: Optional[str] = None, vae: Optional[str] = None) -> None:
        """Make `name` the current model and `vae` the VAE choice ("Automatic", "None" or a VAE's name;
        None leaves either as it is): a job in the queue, after the running one. Unknown names are
        refused here, before anything waits."""
        model = self.folder.find(name).name if name is not None else None
        choice = self.folder.check_vae(vae) if vae is not None else None
        await self.run("load", LoadWork(model, choice))

    def current_model_title(self) -> Optional[str]:
        return self.engine.model_title
