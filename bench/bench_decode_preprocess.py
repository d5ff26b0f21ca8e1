"""Per-stage CPU time of one B-scan on its way to the model, and the alternatives measured against each stage.

    python bench/bench_decode_preprocess.py [--image scan.jpeg] [--repeat 7]

Prints milliseconds per call (best of `--repeat` rounds, so another job on the machine inflates it least): the JPEG
decode (torchvision, PIL), `preprocess_gray` whole, and the resize it does (PIL's float filter) next to others it
could do (PIL 8-bit, torch's antialiased interpolate), with their largest difference from PIL float in 1/255 steps.
Asserts nothing; the service-level number is `bench/bench_overhead.py`'s.
"""

from __future__ import annotations

import argparse
import io
import sys
import timeit
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octcore.preprocess import Preprocessing, crop_white_margins, preprocess_gray  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg


def best_ms(fn: object, repeat: int, number: int = 100) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e3  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, default=None, help="a JPEG B-scan (default: a test Kermany CNV scan)")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    path = args.image or sorted((ROOT / "tests" / "data" / "kermany").rglob("CNV*.jpeg"))[0]
    data = path.read_bytes()
    torch.set_num_threads(1)
    cfg = Preprocessing()

    def tv() -> np.ndarray:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)[0].numpy()

    def pil() -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L"))

    gray = tv()
    u8 = np.ascontiguousarray(crop_white_margins(gray, cfg)[0])
    f32 = u8.astype(np.float32) / 255.0
    side = (cfg.size, cfg.size)
    ref = np.asarray(Image.fromarray(f32).resize(side, Image.Resampling.BILINEAR))
    resizes = {
        "PIL float (in use)": lambda: np.asarray(Image.fromarray(f32).resize(side, Image.Resampling.BILINEAR)),
        "PIL 8-bit, then / 255": lambda: np.asarray(Image.fromarray(u8).resize(side, Image.Resampling.BILINEAR),
                                                    np.float32) / 255.0,
        "torch antialiased float": lambda: F.interpolate(torch.from_numpy(f32)[None, None], size=side, mode="bilinear",
                                                         antialias=True, align_corners=False)[0, 0].numpy(),
    }
    print(f"{path.name}  {gray.shape[1]}×{gray.shape[0]}  {len(data)} bytes  torch threads 1  best of {args.repeat}")
    print(f"{'stage':34s} {'ms':>6s}  max |Δ| vs PIL float (1/255)")
    print(f"{'decode: torchvision decode_jpeg':34s} {best_ms(tv, args.repeat):6.3f}")
    print(f"{'decode: PIL':34s} {best_ms(pil, args.repeat):6.3f}")
    print(f"{'preprocess_gray (all of it)':34s} {best_ms(lambda: preprocess_gray(gray, cfg), args.repeat):6.3f}")
    for name, fn in resizes.items():
        diff = float(np.abs(fn() - ref).max()) * 255
        print(f"{'resize: ' + name:34s} {best_ms(fn, args.repeat):6.3f}  {diff:.1e}")


if __name__ == "__main__":
    main()
