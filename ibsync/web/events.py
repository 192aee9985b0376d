"""The jobs API: a job's state as JSON, and its changes as server-sent events (one ``job``
event per change, the stream ending with the job)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


async def jobs_list(request: Request) -> Response:
    return JSONResponse({"jobs": request.app.state.ctx.jobs.snapshot()})


async def job_state(request: Request) -> Response:
    state = request.app.state.ctx.jobs.snapshot(request.path_params["job_id"])
    if not state:
        return JSONResponse({"error": "no such job"}, status_code=404)
    return JSONResponse(state[0])


async def job_events(request: Request) -> Response:
    jobs = request.app.state.ctx.jobs
    job_id = request.path_params["job_id"]
    if jobs.get(job_id) is None:
        return JSONResponse({"error": "no such job"}, status_code=404)

    async def stream():
        async for state in jobs.subscribe(job_id):
            if await request.is_disconnected():
                return
            for job in state:
                yield f"event: job\ndata: {json.dumps(job)}\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


ROUTES = [
    Route("/api/jobs", jobs_list, name="jobs"),
    Route("/api/jobs/{job_id}", job_state, name="job"),
    Route("/api/jobs/{job_id}/events", job_events, name="job_events"),
]
