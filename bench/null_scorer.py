"""A scorer that costs almost nothing, built from a real export's manifest, so the service's own cost shows.

    python bench/null_scorer.py model_store/kermany-oct/1 /tmp/nullstore --size 256   # writes /tmp/nullstore/null/1/

Same output names as the template (every map and score of its manifest), maps at `--size`², values that follow the
input (so PNG heatmaps cost what real maps cost: a map is half the input, so it is bright where the scan is), as in
the acceptance fixture that measures the service's own cost. `--region retina` makes its input the retina band
(octcore.preprocess), as a model trained with `--input_region retina` has. The service tests serve it as their
fixture scorer (tests/conftest.py: `fixture_model`, `retina_model`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from octcore.preprocess import Preprocessing


class NullScorer(torch.nn.Module):
    def __init__(self, maps: list[str], scores: list[str], work: int = 0) -> None:
        super().__init__()
        self.maps, self.scores = maps, scores
        self.work = work  # 256² matrix products per batch: a batch that takes time, whatever its size
        self.register_buffer("w", torch.full((256, 256), 1.0 / 256))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        m = x * 0.5  # the image's structure, not a constant: a flat map would compress to nothing
        for k in self.maps:
            out[k] = m
        s = x.mean(dim=(1, 2, 3))
        if self.work > 0:
            y = self.w
            for _ in range(self.work):
                y = torch.tanh(y @ self.w)
            s = s + 0.0 * y.mean()  # the work is part of the answer, so it is not optimised away
        for k in self.scores:
            out[k] = s
        return out


def build_null_store(template: Path, out_store: Path, size: int = 256, name: str = "null",
                     region: str | None = None, work: int = 0) -> Path:
    """Write `<out_store>/<name>/1/{model.pt, manifest.json}` from `template` (a version dir); returns that dir.
    `region` ("scan" or "retina"): the input region, else the template's; `work`: 256² matrix products a batch
    (a slow model, for tests that need requests to wait)."""
    man = json.loads((template / "manifest.json").read_text())
    d = out_store / name / "1"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    man["name"], man["version"] = name, 1
    man["input"]["size"] = size
    if "size" in man.get("preprocessing", {}):
        man["preprocessing"]["size"] = size
    if region is not None:  # the band's rows are the preprocessing's defaults (octcore.preprocess.Preprocessing)
        band = Preprocessing(region=region)  # type: ignore[arg-type]
        man["preprocessing"].update(region=band.region, band_above=band.band_above, band_below=band.band_below)
        man["format_version"] = max(3, man.get("format_version", 1))
    model_file = d / man.get("file", "model.pt")
    torch.jit.script(NullScorer(list(man["maps"]), list(man["scores"]), work)).save(str(model_file))
    man["sha256"] = hashlib.sha256(model_file.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man, indent=2))
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("template", type=Path, help="a real export: <store>/<name>/<version>")
    p.add_argument("out_store", type=Path)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--name", default="null")
    p.add_argument("--region", choices=["scan", "retina"], help="the input region (default: the template's)")
    a = p.parse_args()
    print(build_null_store(a.template, a.out_store, a.size, a.name, a.region))


if __name__ == "__main__":
    main()
