"""`python -m service`: load and check the model (exit 1 with a one-line reason if it is unusable), then serve."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from pydantic import ValidationError

from service import security


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        errs = "; ".join(f"OCT_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
        print(f"oct-service: invalid settings: {errs}", file=sys.stderr)
        return 2
    security.enforce(settings)  # off loopback with no API key: exit 2 with the reason (service/security.py)

    import uvicorn

    from octcore.manifest import ModelStoreError
    from service import logs
    from service.engine import Engine
    from service.main import create_app
    from service.metrics import Metrics

    logs.configure(settings.log_format, settings.log_level)
    try:
        engine = Engine.load(settings, Metrics())
    except ModelStoreError as e:
        logging.getLogger("oct.service").error("cannot serve: %s", e)
        print(f"oct-service: cannot load model: {e}", file=sys.stderr)
        return 1
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler that was there before it started;
    # this one turns that into exit status 0, so a graceful stop does not look like a crash to a supervisor.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    # log_config=None keeps our handlers; the audit line replaces uvicorn's access log.
    uvicorn.run(create_app(settings, engine=engine), host=settings.host, port=settings.port, log_config=None,
                access_log=False, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
