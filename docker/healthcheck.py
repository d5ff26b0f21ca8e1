#!/usr/bin/env python3
"""Container health probe: `oct-healthcheck /readyz` exits 0 when the service answers 200 on that path.

Standard library only, so the image needs no curl. The port comes from OCT_PORT, as the service's does.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/readyz"
    port = os.environ.get("OCT_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as r:
            ok = r.status == 200
    except urllib.error.HTTPError as e:  # 503 while loading/warming up, or when the model failed to load
        print(f"{url}: HTTP {e.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
