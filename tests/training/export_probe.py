"""Scoring an exported model the way a serving host would: in a fresh interpreter that cannot import `training`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Runs in a fresh interpreter where `import training` fails: the exported scorer must need only torch + octcore.
_SCORE_WITHOUT_TRAINING = r"""
import json, sys
sys.modules["training"] = None
import torch
from PIL import Image
from octcore.manifest import load_scorer
from octcore.preprocess import preprocess
manifest, scorer = load_scorer(sys.argv[1])
cfg = manifest.preprocessing_config()
x = torch.stack([torch.from_numpy(preprocess(Image.open(f), cfg)) for f in sys.argv[3:]])[:, None]
with torch.no_grad():
    out = scorer(x)
keys = [*manifest.scores, *json.loads(sys.argv[2])]
print(json.dumps({k: out[k].tolist() for k in keys}))
"""


def score_without_training(version_dir: Path, files: list[Path], extra_outputs: tuple[str, ...] = ()) -> dict:
    """Score `files` with the exported model in a subprocess that cannot import `training`; {output: values}."""
    proc = subprocess.run([sys.executable, "-c", _SCORE_WITHOUT_TRAINING, str(version_dir),
                           json.dumps(list(extra_outputs)), *map(str, files)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])
