"""`/api/v1`: sdlab's own API, the one the web page speaks. Submit a job, follow it (polling or a
server-sent event stream with progress and live previews), cancel it.

Events of `GET /api/v1/jobs/{id}/events`, each `event: NAME` and `data: JSON`:
queued {"position"} (again whenever the place changes), started {}, progress {"step", "steps",
"progress", "preview"} (the preview a base64 PNG when a new one is ready, else null; a client slower
than the sampler gets the latest step, not every one), then one of
done {"images", "infotexts", "seeds", "interrupted", "inside"}, failed {"error"}, cancelled {}; the
stream ends there. `inside` is the view of a trajectory, attention or edit job (native_models.InsideView),
else null. A client that goes away while its job still waits cancels the job.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..infotext import parse_infotext
from .http import ApiError
from .images import bytes_base64, decode_image, encode_png_base64, text_chunks
from .jobs import CANCELLED, FAILED, FINISHED, QUEUED, RUNNING, Job
from .native_models import (
    EmbeddingItem, JobCancelled, JobCreated, JobRequest, JobStatus, LoraItem, ModelItem, PngInfoRequest,
    PngInfoResponse, SamplerItem, ScheduleItem,
)
from .native_requests import job_work
from .service import Server

router = APIRouter(prefix="/api/v1", tags=["sdlab API"])
KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from closing a quiet stream


def server_of(request: Request) -> Server:
    return request.app.state.server


def job_of(request: Request, job_id: str) -> Job:
    job = server_of(request).queue.get(job_id)
    if job is None:
        raise ApiError(404, "NotFound", f"no job '{job_id}' (finished jobs are kept for a while, then forgotten)")
    return job


def encoded_images(job: Job) -> list[str]:
    """The job's images as base64 PNGs with their parameters, encoded once."""
    if job.state not in FINISHED:
        return []
    cached = getattr(job, "encoded_images", None)
    if cached is None:
        cached = [encode_png_base64(image, infotext) for image, infotext in zip(job.images, job.infotexts)]
        job.encoded_images = cached
    return cached


@router.post("/jobs", response_model=JobCreated, status_code=202)
async def submit_job(body: JobRequest, request: Request):
    server = server_of(request)
    work = await run_in_threadpool(job_work, body, server.settings, server.folder)
    job = server.submit(body.kind, work)
    return JobCreated(id=job.id, position=server.queue.position(job) or 0)


@router.get("/jobs/{job_id}", response_model=JobStatus)
async def job_status(job_id: str, request: Request):
    job = job_of(request, job_id)
    server = server_of(request)
    state = job.state  # read first: a job's results are complete before its state says finished
    finished = state in FINISHED
    images = await run_in_threadpool(encoded_images, job) if finished else []
    return JobStatus(id=job.id, kind=job.kind, state=state, position=server.queue.position(job), step=job.step,
                     steps=job.steps, progress=1.0 if finished else job.progress, preview=bytes_base64(job.preview),
                     images=images, infotexts=list(job.infotexts) if finished else [],
                     seeds=list(job.seeds) if finished else [], error=job.error,
                     inside=job.inside if finished else None)


@router.delete("/jobs/{job_id}", response_model=JobCancelled)
async def cancel_job(job_id: str, request: Request):
    job = job_of(request, job_id)
    state = server_of(request).queue.cancel(job)
    return JobCancelled(id=job.id, state=state)


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}})
async def job_events(job_id: str, request: Request):
    job = job_of(request, job_id)
    queue = server_of(request).queue

    async def stream():
        sent_position, started, sent_step, sent_preview = None, False, 0, 0
        try:
            while True:
                version = job.changes.version
                state = job.state
                if state == QUEUED:
                    position = queue.position(job)
                    if position is not None and position != sent_position:
                        sent_position = position
                        yield sse("queued", {"position": position})
                if state == RUNNING or (state in FINISHED and job.started is not None and state != CANCELLED):
                    if not started:
                        started = True
                        yield sse("started", {})
                    if job.step != sent_step or job.preview_step != sent_preview:
                        new_preview = job.preview_step != sent_preview
                        sent_step, sent_preview = job.step, job.preview_step
                        yield sse("progress", {"step": job.step, "steps": job.steps, "progress": job.progress,
                                               "preview": bytes_base64(job.preview) if new_preview else None})
                if state in FINISHED:
                    yield await _final_event(job)
                    return
                if await job.changes.wait(version, KEEPALIVE_SECONDS) == version:
                    yield ": keep-alive\n\n"
        finally:
            if job.state == QUEUED:  # the client went away before its job ran
                queue.cancel(job)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _final_event(job: Job) -> str:
    if job.state == FAILED:
        return sse("failed", {"error": job.error})
    if job.state == CANCELLED:
        return sse("cancelled", {})
    images = await run_in_threadpool(encoded_images, job)
    return sse("done", {"images": images, "infotexts": list(job.infotexts), "seeds": list(job.seeds),
                        "interrupted": job.stopped_early, "inside": job.inside})


@router.get("/models", response_model=list[ModelItem])
async def models(request: Request):
    server = server_of(request)
    current = server.current_model_title()
    return await run_in_threadpool(lambda: [ModelItem(name=entry.name, title=entry.title, hash=entry.short_hash,
                                                      current=entry.title == current) for entry in server.folder.entries])


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers():
    from ..samplers import list_samplers

    return [SamplerItem(name=name, aliases=list(aliases)) for name, aliases in list_samplers()]


@router.get("/schedules", response_model=list[ScheduleItem])
async def schedules():
    from ..schedules import list_schedules

    return [ScheduleItem(name=key, label=label) for key, label in list_schedules()]


@router.get("/loras", response_model=list[LoraItem])
async def loras(request: Request):
    folder = server_of(request).folder
    root = folder.models_dir or ""
    return [LoraItem(name=name, path=path[len(root):].lstrip("/") if root and path.startswith(root) else name)
            for name, path in folder.loras()]


@router.get("/embeddings", response_model=list[EmbeddingItem])
async def embeddings(request: Request):
    return [EmbeddingItem(name=name) for name in server_of(request).engine.embeddings["loaded"]]


@router.post("/png-info", response_model=PngInfoResponse)
async def png_info(body: PngInfoRequest, request: Request):
    image = await run_in_threadpool(decode_image, body.image, "image", server_of(request).settings.max_image_pixels)
    parameters = text_chunks(image).get("parameters")
    return PngInfoResponse(parameters=parameters, fields=parse_infotext(parameters) if parameters else {})
