"""What routes need, as `Annotated[..., Depends()]` aliases: a signature says what a route uses, tests can swap it.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker thread, a thread hop
per dependency per request for what is an attribute lookup."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.engine import Engine
from service.errors import NotReady, Unauthorized
from service.metrics import Metrics
from service.security import anonymous_off_loopback
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReady("model not loaded", headers={"Retry-After": "1"})
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]


# The two ways to send a key, as OpenAPI security schemes (Swagger UI's "Authorize" fills them in). Both optional
# here: `authorize` decides, because with no OCT_API_KEYS on loopback no key is needed at all.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, a key from OCT_API_KEYS")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`, instead")


async def require_api_key(
    request: Request,
    _bearer_scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    _key_scheme: Annotated[str | None, Depends(_api_key_header)],
) -> None:
    """The key check as a dependency. The two scheme parameters put the security schemes in OpenAPI; the key itself
    is read by `authorize`, the one reading of it, which `POST /score` calls directly."""
    authorize(request)


def authorize(request: Request) -> None:
    """401 unless the request carries one of OCT_API_KEYS (or none are set): `X-API-Key`, else a non-empty
    `Authorization: Bearer`, read the way the two security schemes read them. The hot path (`POST /score`) calls
    this instead of having FastAPI solve the dependency per request; its OpenAPI names the same schemes."""
    settings: Settings = request.app.state.settings  # not a sub-dependency: this runs on every request
    if not settings.api_keys:
        return
    offered = request.headers.get("x-api-key") or None  # an empty header counts as none, as in APIKeyHeader
    if offered is None:
        scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
        offered = credentials if scheme.lower() == "bearer" and credentials else None
    if offered is None:
        raise Unauthorized("send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                           headers={"WWW-Authenticate": "Bearer"})
    # Compare against every key in constant time, so timing tells nothing about which prefix matched.
    ok = False
    for key in settings.api_keys:
        ok |= secrets.compare_digest(offered.encode(), key.encode())
    if not ok:
        raise Unauthorized("API key not recognised", headers={"WWW-Authenticate": "Bearer"})


AuthDep = Annotated[None, Depends(require_api_key)]


async def require_results_key(settings: SettingsDep) -> None:
    """Results carry patient data (the SR and SC copy name, ID and birth date): never anonymous off loopback, even
    with OCT_ALLOW_ANONYMOUS=true (which opens scoring only)."""
    if anonymous_off_loopback(settings):
        raise Unauthorized("results carry patient data and are served only with an API key when the service listens "
                           "beyond loopback; set OCT_API_KEYS", headers={"WWW-Authenticate": "Bearer"})


# `authorize`'s OpenAPI: the operation lists the same two schemes, as alternatives (an `openapi_extra` fragment).
SECURITY_REQUIREMENTS = [{_bearer.scheme_name: []}, {_api_key_header.scheme_name: []}]
