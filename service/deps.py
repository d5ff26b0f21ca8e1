"""What routes need, as `Annotated[..., Depends()]` aliases: a signature says what a route uses, tests can swap it
(`app.dependency_overrides`).

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker thread, a thread hop
per dependency per request for what is an attribute lookup."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import NotReady, Unauthorized
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline
from service.schemas import ScoreQuery
from service.security import anonymous_off_loopback
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_pipeline(request: Request) -> Pipeline:
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReady("model not loaded", headers={"Retry-After": "1"})
    return pipeline


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ScoreQueryDep = Annotated[ScoreQuery, Query()]


# The two ways to send a key, as OpenAPI security schemes (Swagger UI's "Authorize" fills them in). Both optional
# here: `require_api_key` decides, because with no OCT_API_KEYS on loopback no key is needed at all.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, a key from OCT_API_KEYS")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`, instead")


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """401 unless the request carries one of OCT_API_KEYS (or none are set): `X-API-Key`, else a non-empty
    `Authorization: Bearer`. Both schemes are optional (either header will do, and with no OCT_API_KEYS neither is
    needed), so this decides; they list the two headers in OpenAPI, as alternatives."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    offered = api_key or (bearer.credentials if bearer is not None else None)
    if offered is None:
        raise Unauthorized("send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
    # Compare against every key in constant time, so timing tells nothing about which prefix matched.
    ok = False
    for key in settings.api_keys:
        ok |= secrets.compare_digest(offered.encode(), key.encode())
    if not ok:
        raise Unauthorized("API key not recognised", headers={"WWW-Authenticate": "Bearer"})




async def require_results_key(settings: SettingsDep) -> None:
    """Results carry patient data (the SR and SC copy name, ID and birth date): never anonymous off loopback, even
    with OCT_ALLOW_ANONYMOUS=true (which opens scoring only)."""
    if anonymous_off_loopback(settings):
        raise Unauthorized("results carry patient data and are served only with an API key when the service listens "
                           "beyond loopback; set OCT_API_KEYS", headers={"WWW-Authenticate": "Bearer"})

