"""The FastAPI application: JSON API under ``/api`` (schema at ``/openapi.json``, docs at
``/docs``) and the annotation page at ``/``.

Images are addressed by id = their path relative to the dataset folder (see ``storage``); the id
is the last part of each URL, e.g. ``POST /api/predict/street/cars.jpg``.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .. import __version__
from ..io import ImageError
from ..predictor import PromptError
from .engine import ModelService, NotReady
from .rle import RLEError
from .storage import BadRequest, Dataset, Forbidden, NotFound, TooLarge

STATIC = Path(__file__).parent / "static"


# ----------------------------------------------------------------- request bodies
class PredictRequest(BaseModel):
    points: List[Tuple[float, float]] = Field(default_factory=list, max_length=256, description="[[x, y], ...] in image pixels")
    labels: List[int] = Field(default_factory=list, max_length=256, description="1 = foreground, 0 = background, per point")
    box: Optional[Tuple[float, float, float, float]] = Field(None, description="[x0, y0, x1, y1] in image pixels")
    mask_input_id: Optional[str] = Field(None, max_length=64, description="logits_id of a previous prediction on this image, to refine it")
    multimask: bool = Field(True, description="return 3 candidates (True) or 1")
    snap_edges: bool = Field(False, description="snap the masks' outlines to the image's edges (segany.edges; not SAM's own output)")


class ProposalRequest(BaseModel):
    points_per_side: int = Field(16, ge=2, le=64)
    pred_iou_thresh: Optional[float] = Field(None, ge=0.0, le=1.0, description="default: the model's calibrated value, else 0.80")
    stability_score_thresh: Optional[float] = Field(None, ge=0.0, le=1.0, description="default: the model's calibrated value, else 0.85")
    box_nms_thresh: float = Field(0.7, gt=0.0, le=1.0)
    max_masks: int = Field(100, ge=1, le=500)


# proposals for an annotator to accept or reject: a little looser than SAM's fully automatic 0.88/0.95
PROPOSAL_THRESHOLDS = {"pred_iou_thresh": 0.80, "stability_score_thresh": 0.85}


class AnnotationsBody(BaseModel):
    annotations: List[Dict[str, Any]] = Field(..., max_length=10000, description="SA-1B annotations; area and bbox are recomputed from the RLE")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _host_name(host: str) -> str:
    """Host header -> host name without port ("[::1]:8000" -> "::1", "localhost:80" -> "localhost")."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``limit`` bytes with 413, whether the client
    declared the length or streams it; refuse writes from pages of other origins with 403; with
    ``allowed_hosts``, refuse any request whose Host header names another host with 400 (a server
    on 127.0.0.1 is otherwise reachable from a web page through DNS rebinding)."""

    def __init__(self, app, limit: int, allowed_hosts: Optional[Sequence[str]] = None) -> None:
        self.app, self.limit = app, limit
        self.allowed_hosts = tuple(allowed_hosts) if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _host_name(host).lower() not in self.allowed_hosts:
                return await _send_error(send, 400, f"Host header {host!r} refused: this server answers only to {', '.join(self.allowed_hosts)}")
        origin = headers.get(b"origin")
        if origin is not None and scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
            # a page from another site must not write into the dataset through the user's browser
            o = origin.decode("latin-1").split("://", 1)[-1].rstrip("/")
            if o != headers.get(b"host", b"").decode("latin-1"):
                return await _send_error(send, 403, f"cross-origin request from {origin.decode('latin-1')} refused")
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await _send_error(send, 413, f"request body is {int(declared)} bytes, above the limit of {self.limit}")
        seen = 0
        started = responded = False

        async def limited_receive():
            nonlocal seen, responded
            if responded:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    if not started:
                        await _send_error(send, 413, f"request body is above the limit of {self.limit} bytes")
                    responded = True
                    return {"type": "http.disconnect"}  # the app stops reading
            return msg

        async def tracking_send(msg):
            nonlocal started
            if responded:
                return  # we already answered 413
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not responded:
                raise


async def _send_error(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(
    dataset_dir,
    model,
    cache_size: int = 8,
    max_upload_bytes: int = 32 << 20,
    max_pixels: int = 50_000_000,
    allowed_hosts: Optional[Sequence[str]] = None,
) -> FastAPI:
    """The server for ``dataset_dir`` with a loaded SAM ``model`` (see ``segany serve``).
    ``allowed_hosts``: host names the Host header may carry (None: any)."""
    ds = Dataset(dataset_dir, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels)
    svc = ModelService(model, cache_size=cache_size)

    @asynccontextmanager
    async def lifespan(app):
        yield
        svc.close()

    app = FastAPI(
        lifespan=lifespan,
        title="segany annotation server",
        version=__version__,
        description="Interactive Segment Anything: embed an image once, click to get masks (COCO RLE), "
        "save per-image SA-1B JSON beside the images, export COCO. Image ids are paths relative to the dataset folder.",
    )
    app.state.dataset, app.state.service = ds, svc

    errors = {NotFound: 404, Forbidden: 403, BadRequest: 400, PromptError: 400, ImageError: 400, RLEError: 400, NotReady: 409, TooLarge: 413}
    for exc, code in errors.items():
        app.add_exception_handler(exc, lambda req, e, code=code: JSONResponse({"detail": str(e)}, status_code=code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts), "errors": [{k: v for k, v in err.items() if k in ("loc", "msg", "type")} for err in e.errors()[:20]]}, status_code=422)

    def rec_of(image_id: str):
        return ds.get(image_id)

    # ------------------------------------------------------------- API
    @app.get("/api/info", tags=["server"], summary="Model, limits and cache state")
    def info() -> Dict[str, Any]:
        return {
            "version": __version__, "model": svc.name, "dataset": ds.root.name,
            "max_upload_bytes": ds.max_upload_bytes, "max_pixels": ds.max_pixels,
            "cache": svc.cache_info(),
        }

    @app.get("/api/images", tags=["images"], summary="List the dataset's images")
    def list_images() -> Dict[str, Any]:
        out = []
        for r in ds.images():
            d = r.public()
            d["annotated"] = r.ann_path.exists()
            d["embedding"] = svc.status(r)["state"]
            out.append(d)
        return {"images": out}

    @app.post("/api/images", tags=["images"], status_code=201, summary="Upload an image into the dataset folder")
    async def upload(file: UploadFile = File(..., description="an image file (jpg, png, webp, bmp, gif, tif)")) -> Dict[str, Any]:
        data = await file.read(ds.max_upload_bytes + 1)
        rec = ds.save_upload(file.filename or "", data)
        return rec.public()

    @app.get("/api/image/{image_id:path}", tags=["images"], summary="One image: size, neighbours, embedding status")
    def image_info(image_id: str) -> Dict[str, Any]:
        r = rec_of(image_id)
        d = r.public()
        d.update(ds.neighbours(r.id))
        d["embedding"] = svc.status(r)
        return d

    @app.get("/api/file/{image_id:path}", tags=["images"], summary="The image itself (upright, browser-displayable)")
    def image_file(image_id: str):
        r = rec_of(image_id)
        content, media = ds.display_file(r)
        if isinstance(content, Path):
            return FileResponse(content, media_type=media)
        return Response(content, media_type=media)

    @app.post("/api/embed/{image_id:path}", tags=["embedding"], summary="Start computing the image embedding (cached)")
    def embed(image_id: str) -> Dict[str, Any]:
        r = rec_of(image_id)
        return svc.request(r, ds.load_pixels)

    @app.get("/api/status/{image_id:path}", tags=["embedding"], summary="Embedding status: none, queued, running (progress), ready, error")
    def status(image_id: str) -> Dict[str, Any]:
        return svc.status(rec_of(image_id))

    @app.post("/api/predict/{image_id:path}", tags=["prompts"], summary="Masks from points / box / previous mask (COCO RLE + scores)")
    def predict(image_id: str, body: PredictRequest) -> Dict[str, Any]:
        r = rec_of(image_id)
        entry = svc.entry(r, ds.load_pixels)
        return svc.predict(entry, body.points, body.labels, body.box, body.mask_input_id, body.multimask,
                           snap_edges=body.snap_edges, load_pixels=lambda: ds.load_pixels(r))

    @app.post("/api/proposals/{image_id:path}", tags=["prompts"], summary="Segment everything: confident mask proposals")
    def proposals(image_id: str, body: Optional[ProposalRequest] = None) -> Dict[str, Any]:
        body = body or ProposalRequest()
        r = rec_of(image_id)
        entry = svc.entry(r, ds.load_pixels)
        t0 = time.perf_counter()
        # a model trained by segany may carry its own thresholds (SAM's suit only SAM's IoU head)
        defaults = {**PROPOSAL_THRESHOLDS, **getattr(svc.model, "everything_defaults", {})}
        props = svc.proposals(
            entry, points_per_side=body.points_per_side,
            pred_iou_thresh=defaults["pred_iou_thresh"] if body.pred_iou_thresh is None else body.pred_iou_thresh,
            stability_score_thresh=defaults["stability_score_thresh"] if body.stability_score_thresh is None else body.stability_score_thresh,
            box_nms_thresh=body.box_nms_thresh, max_masks=body.max_masks,
        )
        return {"proposals": props, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}

    @app.get("/api/annotations/{image_id:path}", tags=["annotations"], summary="The image's SA-1B annotations")
    def get_annotations(image_id: str) -> Dict[str, Any]:
        return ds.read_annotations(rec_of(image_id))

    @app.put("/api/annotations/{image_id:path}", tags=["annotations"], summary="Replace the image's annotations (atomic write)")
    def put_annotations(image_id: str, body: AnnotationsBody) -> Dict[str, Any]:
        return ds.write_annotations(rec_of(image_id), body.annotations)

    @app.get("/api/export", tags=["annotations"], summary="The whole dataset as one COCO JSON")
    def export() -> JSONResponse:
        return JSONResponse(ds.export_coco(), headers={"Content-Disposition": 'attachment; filename="coco.json"'})

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def api_404(rest: str):
        return JSONResponse({"detail": f"no such API endpoint /api/{rest}"}, status_code=404)

    # ------------------------------------------------------------- page
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # JSON bodies (annotations) may be large, but never larger than an upload plus 1 MiB
    app.add_middleware(BodyLimit, limit=max_upload_bytes + (1 << 20), allowed_hosts=allowed_hosts)
    return app
