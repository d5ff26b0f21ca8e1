"""Figures for training and evaluation (matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_loss_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("loss", "recon", "vq"), strict=True):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="val")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(rows: list[tuple[str, dict[str, np.ndarray]]], path: Path, title: str,
              outlines: list[np.ndarray] | None = None) -> None:
    """One row per image; columns are the named panels (input, reconstruction, maps). `outlines`: one bool mask per
    row (the lesion), drawn as a contour on every anomaly map so one sees whether the map points at it."""
    cols = list(rows[0][1])
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 2.6 * len(rows)), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            img = panels[name]
            is_map = name not in ("input", "reconstruction")
            ax.imshow(img, cmap="inferno" if is_map else "gray")
            if is_map and outlines is not None and outlines[r].any():
                ax.contour(outlines[r].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(scores: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.3), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        bins = np.histogram_bin_edges(values, bins=30)
        for cls in classes:
            ax.hist(values[labels == cls], bins=bins, alpha=0.5, label=cls)
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
