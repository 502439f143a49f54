"""The FastAPI app: a JSON API and the page in static/, over one `SearchService`.

    from simsearch.server import create_app
    app = create_app("photos.db")          # or an open Index; then serve it with uvicorn

Security stance: images leave the server only as the table's stored thumbnails and match pictures,
looked up by integer key (a path in a request is never opened); request bodies are bounded before
they are parsed and images are bounded in pixels by `open_image`; every error is `{"error": message}`
with its status, never a traceback; CORS headers only for origins given explicitly.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EmptyIndexError, ImageError, SimsearchError
from ..index import CANDIDATES, MAX_CANDIDATES, Index, rerank_candidates
from ..store import MissingRowsError
from .service import SearchService, UnknownQuery, UploadTooLarge

STATIC = Path(__file__).parent / "static"
MAX_KEY = 2**63 - 1
ENVELOPE_BYTES = 64 << 10  # multipart framing and form fields around the uploaded file
log = logging.getLogger("simsearch.server")

# Most specific first: the first class that matches decides the status.
STATUS = ((UploadTooLarge, 413), (ImageError, 422), (UnknownQuery, 404),
          (EmptyIndexError, 409), (SimsearchError, 400))
# The page and its files allow nothing from elsewhere; /docs loads Swagger UI from its CDN.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'none'")

Mode = Literal["content", "style"]
Rerank = Literal["none", "verified", "aas", "matches", "both"]
Order = Literal["newest", "oldest"]
K = Annotated[int, Query(ge=1, le=1000, description="Number of hits.")]
CANDIDATES_HELP = f"First-stage hits to rerank (default {CANDIDATES}; a region's {rerank_candidates(None, region=True)})."
Candidates = Annotated[int | None, Query(ge=1, le=MAX_CANDIDATES, description=CANDIDATES_HELP)]
Where = Annotated[str | None, Query(max_length=2000, description="SQL filter on the table, as the CLI's --where.")]
BOX_HELP = "Search for this region of the query: x0,y0,x1,y1 in pixels of the query image."
Box = Annotated[str | None, Query(max_length=100, description=BOX_HELP)]
Folder = Annotated[str | None, Query(max_length=4000, description="Only images at or below this folder (a stored path).")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, port: int) -> str | None:
    """The line `simsearch serve` prints when it binds anything but loopback (None when it does not)."""
    if is_loopback(host):
        return None
    return (f"WARNING: serving on {host}:{port}, reachable from other machines. There is no authentication: "
            f"anyone who can connect can search this database and see its thumbnails and file paths.")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """ASGI middleware: refuses request bodies over `max_bytes` (by Content-Length, or while a chunked
    body streams in) with 413 before anything parses them, and adds the security headers."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await error(400, "invalid Content-Length header")(scope, receive, send)
        if int(length) > self.max_bytes:
            return await error(413, f"request body exceeds the {self.max_bytes:,}-byte limit")(scope, receive, send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # FastAPI lets an HTTPException raised here through its body parser
                raise HTTPException(413, f"request body exceeds the {self.max_bytes:,}-byte limit")
            return message

        docs = scope["path"].startswith(("/docs", "/redoc"))

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer"),
                                      *([] if docs else [(b"content-security-policy", PAGE_POLICY.encode())])]
            await send(message)

        await self.app(scope, bounded_receive, secured_send)


def create_app(index_or_db: Index | str | Path, max_upload_mb: float = 20, cors: list[str] | tuple[str, ...] = (),
               query_cache: int = 64, device: str = "auto", runtime: str = "auto") -> FastAPI:
    """The app over an open `Index` or the database at a path. Loads the model and FAISS indexes now,
    so the first request is as fast as any other."""
    index = index_or_db if isinstance(index_or_db, Index) else Index(index_or_db, device=device, runtime=runtime)
    service = SearchService(index, max_upload_bytes=int(max_upload_mb * (1 << 20)), query_cache=query_cache)
    app = FastAPI(title="simsearch", version="1", summary="Images like this one (content) or in this style.",
                  description="Search by upload or by an indexed image's key; thumbnails and correspondence "
                              "pictures by key. Errors are `{\"error\": message}`.")
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(Guard, max_bytes=service.max_upload_bytes + ENVELOPE_BYTES)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"], allow_headers=["*"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SimsearchError)
    async def simsearch_error(request: Request, exc: SimsearchError):
        if isinstance(exc, MissingRowsError):
            return error(404, f"no indexed image has key {exc.keys[0]}")
        return error(next(status for cls, status in STATUS if isinstance(exc, cls)), str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _add_routes(app: FastAPI, service: SearchService) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info", summary="Rows, model and descriptor configuration, FAISS state, server limits")
    def info():
        return service.info()

    @app.post("/api/search", summary="Search by an uploaded image")
    def search_upload(image: Annotated[UploadFile, File(description="The query image.")],
                      mode: Annotated[Mode, Form()] = "content", k: Annotated[int, Form(ge=1, le=1000)] = 10,
                      rerank: Annotated[Rerank, Form()] = "none", candidates: Annotated[int | None, Form(ge=1, le=MAX_CANDIDATES, description=CANDIDATES_HELP)] = None,
                      where: Annotated[str | None, Form(max_length=2000)] = None,
                      box: Annotated[str | None, Form(max_length=100, description=BOX_HELP)] = None):
        """Hits for the image; `query.id` names it for `/api/match/{key}?query_id=` for a while."""
        data = image.file.read(service.max_upload_bytes + 1)
        name = Path(image.filename or "upload").name[:200]
        return service.search_upload(data, name, mode, k, _rerank(rerank), candidates, where or None, box or None)

    @app.get("/api/search", summary="Search from an indexed image, by its key")
    def search_key(key: Annotated[int, Query(ge=0, le=MAX_KEY)], mode: Mode = "content", k: K = 10,
                   rerank: Rerank = "none", candidates: Candidates = None, where: Where = None, box: Box = None):
        return service.search_key(_key(key), mode, k, _rerank(rerank), candidates, where or None, box or None)

    @app.get("/api/images", summary="A page of the indexed images, most recently indexed first")
    def images(offset: Annotated[int, Query(ge=0, le=MAX_KEY)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 48,
               under: Folder = None, order: Order = "newest"):
        """Rows of key, path, width, height, bytes and mtime (seconds); `total` counts what the pages cover.
        Reads only the page's rows."""
        return service.images(offset, limit, under, order)

    @app.get("/api/folders", summary="The folder holding the images below `under`, and its subfolders")
    def folders(under: Folder = None):
        return service.folders(under)

    @app.get("/api/dedup", summary="Duplicate groups (exact and verified near copies), around the image to keep")
    def dedup(threshold: Annotated[float | None, Query(ge=0, le=2, description="Verified score a pair needs (default: the library's).")] = None,
              under: Annotated[str | None, Query(max_length=4096, description="Only images at or below this folder.")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50, offset: Annotated[int, Query(ge=0)] = 0):
        """Groups as `simsearch dedup --json` prints them (keys as strings), a page of them at a time.
        Pairs not verified yet are verified first; a new threshold re-groups from stored scores."""
        return service.dedup(threshold, under or None, limit, offset)

    @app.get("/api/thumb/{key:int}", summary="An indexed image's stored thumbnail (JPEG)",
             responses={200: {"content": {"image/jpeg": {}}}}, response_class=Response)
    def thumbnail(key: int, request: Request):
        data, etag = service.thumbnail(_key(key))
        headers = {"ETag": f'"{etag}"', "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/match/{key:int}", summary="Correspondences between a query and an indexed image (PNG)",
             responses={200: {"content": {"image/png": {}}}}, response_class=Response)
    def match(key: int, query_id: Annotated[str | None, Query(max_length=64)] = None,
              query_key: Annotated[int | None, Query(ge=0, le=MAX_KEY)] = None, n: Annotated[int, Query(ge=1, le=32)] = 8):
        """The query (`query_id` of an upload, or `query_key` of an indexed image) beside image `key`."""
        return Response(service.match_png(_key(key), query_id, query_key, n), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=600"})


def _rerank(value: str) -> str | None:
    return None if value == "none" else value


def _key(key: int) -> int:
    if key > MAX_KEY:
        raise MissingRowsError([key])
    return key
