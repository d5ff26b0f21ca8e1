"""`python -m service`: load and check the model (exit 1 with a one-line reason if it is unusable), then serve."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from service import security


def main() -> int:
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        errs = "; ".join(f"OCT_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
        print(f"oct-service: invalid settings: {errs}", file=sys.stderr)
        return 2
    refusal = security.startup_refusal(settings)  # off loopback with no API key (service/security.py)
    if refusal is not None:
        print(f"oct-service: {refusal}", file=sys.stderr)
        return 2

    from octcore.manifest import ModelStoreError
    from service import logs
    from service.main import create_app
    from service.processes import ServingState, bind, serve_one, supervise

    logs.configure(settings.log_format, settings.log_level)
    logs.quiet_libraries()
    security.warn_if_open(settings)
    if settings.workers == 1:
        from service.metrics import Metrics
        from service.pipeline.pipeline import Pipeline

        try:
            pipeline = Pipeline.load(settings, Metrics())
        except ModelStoreError as e:
            logging.getLogger("oct.service").error("cannot serve: %s", e)
            print(f"oct-service: cannot load model: {e}", file=sys.stderr)
            return 1
    try:
        sock = bind(settings)
    except OSError as e:
        print(f"oct-service: cannot listen on {settings.host}:{settings.port}: {e.strerror}", file=sys.stderr)
        return 1
    if settings.workers > 1:  # each worker loads the model; one that cannot makes the supervisor exit 1
        return supervise(settings, sock, create_app)
    state = ServingState()
    serve_one(settings, create_app(settings, pipeline, state), sock, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
