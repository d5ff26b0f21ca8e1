"""Who may start the service open, and who may read results: the policy in one place (docs/security.md).

A service that listens beyond loopback without an API key is open to the whole network, and its results (SR and
Secondary Capture) carry the patient's name, ID and birth date. So it refuses to start that way unless the operator
says `OCT_ALLOW_ANONYMOUS=true`, and even then results are never served without a key.
"""

from __future__ import annotations

import ipaddress
import logging

from service.settings import Settings

log = logging.getLogger("oct.security")

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """True when `host` (OCT_HOST) is reachable from this machine only. `0.0.0.0`/`::` are every interface."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or interface address: reachable from the network


def anonymous_off_loopback(settings: Settings) -> bool:
    return not settings.api_keys and not is_loopback(settings.host)


def startup_refusal(settings: Settings) -> str | None:
    """One line saying why these settings must not serve, or None."""
    if anonymous_off_loopback(settings) and not settings.allow_anonymous:
        return (f"refusing to serve on {settings.host} without an API key: set OCT_API_KEYS (comma-separated), "
                "bind OCT_HOST=127.0.0.1, or accept an open API with OCT_ALLOW_ANONYMOUS=true")
    return None


def warn_if_open(settings: Settings) -> None:
    """`python -m service` calls this on every start that runs open (after `startup_refusal` let it start)."""
    if anonymous_off_loopback(settings):
        log.warning("OCT_ALLOW_ANONYMOUS=true: /score, /models and STOW-RS are open to anyone who reaches %s; "
                    "results (/dicomweb/results) stay refused until OCT_API_KEYS is set", settings.host)


def require_safe(settings: Settings) -> None:
    """The app factory's check: the same refusal for an app served by any other ASGI server."""
    reason = startup_refusal(settings)
    if reason is not None:
        raise RuntimeError(reason)
