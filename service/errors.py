"""Every error leaves the service as `application/problem+json` (RFC 9457) with a stable `type` URI.

Routes raise `Problem` subclasses; FastAPI's own validation errors, Starlette's HTTP errors and anything unexpected
are turned into problems here too, so a client never sees a traceback or an HTML/plain-text error page.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.redaction import scrub

log = logging.getLogger("oct.service")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:oct-anomaly:problem:"


class ProblemDetail(BaseModel):
    """The body of every error response."""

    type: str = Field(description=f"Stable identifier of the error kind, `{TYPE_PREFIX}<slug>`")
    title: str
    status: int
    detail: str
    instance: str | None = Field(default=None, description="The request path")
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = Field(default=None, description="Per-field problems (bad-request only)")


class Problem(Exception):
    """An error a client caused (or, for 503, should retry). Subclasses fix the status, slug and title."""

    status = 400
    slug = "bad-request"
    title = "Malformed request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None,
                 errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors


class BadRequest(Problem):
    pass


class InvalidParameters(Problem):
    status, slug, title = 422, "invalid-parameters", "A path, query or header parameter failed validation"


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Missing or wrong API key"


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Upload larger than OCT_MAX_UPLOAD_BYTES"


class UnsupportedMediaType(Problem):
    status, slug, title = 415, "unsupported-media-type", "Unsupported content type"


class UndecodableImage(Problem):
    status, slug, title = 422, "undecodable-image", "The upload is not a readable image"


class ImageTooLarge(Problem):
    status, slug, title = 422, "image-too-large", "Image dimensions over the service's limits"


class DecompressionBomb(Problem):
    status, slug, title = 422, "decompression-bomb", "Image would decompress to too many pixels"


class UnsupportedImage(Problem):
    status, slug, title = 422, "unsupported-image", "Image mode or layout not supported"


class NoRetina(Problem):
    status, slug, title = 422, "no-retina", "No retina found"


class Overloaded(Problem):
    status, slug, title = 503, "overloaded", "Scoring queue is full; retry later"


class Busy(Problem):
    status, slug, title = 503, "busy", "Too much data in flight (OCT_MAX_INFLIGHT_*); retry later"


class NotReady(Problem):
    status, slug, title = 503, "not-ready", "Model not loaded or still warming up"


class ShuttingDown(Problem):
    status, slug, title = 503, "shutting-down", "Service is shutting down"


# Statuses Starlette/FastAPI raise themselves (unknown path, wrong method, …).
_HTTP_SLUGS = {404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed")}


def problem_response(request: Request, status: int, slug: str, title: str, detail: str, *,
                     headers: dict[str, str] | None = None, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    # scrub: the last net under "no patient data in an error text" (service/dicom/phi.py).
    body = ProblemDetail(type=TYPE_PREFIX + slug, title=title, status=status, detail=scrub(detail),
                         instance=request.url.path, request_id=request.scope.get("oct.request_id"), errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=PROBLEM_JSON)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(request, exc.status, exc.slug, exc.title, exc.detail, headers=exc.headers,
                            errors=exc.errors)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Keep location, message and type; drop `input`/`ctx`, which may echo request data back.
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
    # 422, as FastAPI documents validation errors in every operation's OpenAPI (errors.openapi_problems).
    return problem_response(request, InvalidParameters.status, InvalidParameters.slug, InvalidParameters.title,
                            detail, errors=errors)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
    if exc.status_code == 400:
        slug, title = BadRequest.slug, BadRequest.title
    return problem_response(request, exc.status_code, slug, title, str(exc.detail), headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The formatter scrubs the message and traceback of this request's DICOM text values (service/dicom/phi.py).
    log.error("unhandled error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
    return problem_response(request, 500, "internal-error", "Internal error",
                            "The service failed to handle this request; it has been logged.")


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
    _document_validation_problems(app)


def _document_validation_problems(app: FastAPI) -> None:
    """FastAPI documents every 422 as `application/json` HTTPValidationError; the service answers problem+json.

    FastAPI's documented way to change the generated schema ("Extending OpenAPI"): replace `app.openapi` with a
    function that builds the schema once, edits it and caches it in `app.openapi_schema`. It builds with FastAPI's
    own `app.openapi` rather than `get_openapi(...)`, so the app's title, version and servers stay FastAPI's."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        problem = {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}
        for item in schema.get("paths", {}).values():
            for op in item.values():
                answer = op.get("responses", {}).get("422")
                if answer is None:
                    continue
                content = answer.setdefault("content", {})
                if "HTTPValidationError" in str(content.get("application/json", "")):
                    content.pop("application/json")
                    slug = f"`{TYPE_PREFIX}{InvalidParameters.slug}`: {InvalidParameters.title}"
                    answer["description"] = slug if answer.get("description") in (None, "", "Validation Error") \
                        else f"{answer['description']}; {slug}"
                content[PROBLEM_JSON] = problem
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components.setdefault("ProblemDetail",
                              ProblemDetail.model_json_schema(ref_template="#/components/schemas/{model}"))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem_responses(*problems: type[Problem]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entry documenting the problem types a route can answer with."""
    out: dict[int | str, dict[str, Any]] = {}
    for p in problems:
        # `model` registers the ProblemDetail schema so the problem+json `$ref` resolves.
        entry = out.setdefault(p.status, {"description": "", "model": ProblemDetail, "content": {PROBLEM_JSON: {
            "schema": {"$ref": "#/components/schemas/ProblemDetail"}}}})
        entry["description"] = (entry["description"] + "; " if entry["description"] else "") + \
            f"`{TYPE_PREFIX}{p.slug}`: {p.title}"
    return out
