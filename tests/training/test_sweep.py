from __future__ import annotations

from pathlib import Path

import yaml

from training.train import build_parser

SWEEP = Path(__file__).resolve().parents[2] / "training" / "sweep.yaml"


def test_sweep_grid_is_the_original_and_every_parameter_is_a_cli_argument() -> None:
    sweep = yaml.safe_load(SWEEP.read_text())
    params = {k: v["values"] for k, v in sweep["parameters"].items()}
    assert params == {"learning_rate": [1e-3, 1e-4, 1e-5], "beta": [0.1, 0.25, 0.5], "embedding_dim": [64, 128],
                      "n_embeddings": [32, 64], "n_hiddens": [128, 256], "dropout": [0.1, 0.2]}
    parser = build_parser()
    # W&B passes `--name=value`; every combination must parse.
    args = parser.parse_args([f"--{k}={v[0]}" for k, v in params.items()] + ["--wandb"])
    assert args.learning_rate == 1e-3 and args.wandb
    assert sweep["metric"] == {"name": "val_loss", "goal": "minimize"}
    assert "training.train" in sweep["command"]
