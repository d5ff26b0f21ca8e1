"""Export's choice of the served (primary) score on held-out scans."""

from __future__ import annotations

import pytest

from octcore.manifest import ScoreSpec
from training.export import PREFERRED_SCORE, ExportError, auroc_standard_error, choose_primary

SPECS = {k: ScoreSpec(description=k, map=None) for k in ("residual", "alm", "nll", "fused", "combined")}


def _held_out(**aurocs: float) -> dict[str, dict]:
    return {k: {"auroc": v, "auprc": v, "n_normal": 71, "n_abnormal": 30} for k, v in aurocs.items()}


def test_hanley_mcneil_standard_error_by_hand() -> None:
    # A = 0.5, 10 + 10 scans: Q1 = Q2 = 1/3, SE² = (1/4 + 9·(1/12) + 9·(1/12)) / 100 = 0.0175.
    assert auroc_standard_error(0.5, 10, 10) == pytest.approx(0.0175 ** 0.5)
    assert auroc_standard_error(1.0, 10, 10) == pytest.approx(0.0)
    assert auroc_standard_error(0.9, 1000, 1000) < auroc_standard_error(0.9, 30, 30)


def test_the_preferred_score_wins_within_one_standard_error_of_the_best() -> None:
    """71 + 30 scans: residual 0.932 vs fused 0.911 is within noise (SE ≈ 0.025)."""
    assert PREFERRED_SCORE == "fused"  # the scorer declares it (training/scorer.py, role "preferred")
    held = _held_out(residual=0.932, alm=0.855, nll=0.824, fused=0.911, combined=0.92)
    assert choose_primary(held, SPECS, None) == "fused"


def test_a_clearly_better_score_still_wins() -> None:
    assert choose_primary(_held_out(residual=0.99, alm=0.7, nll=0.7, fused=0.85), SPECS, None) == "residual"
    assert choose_primary(_held_out(residual=0.8, alm=0.6), SPECS, None) == "residual"  # no fused scored


def test_without_held_out_scans_the_preferred_score_is_served() -> None:
    assert choose_primary({}, SPECS, None) == "fused"
    assert choose_primary({}, {k: SPECS[k] for k in ("residual", "alm")}, None) == "residual"  # no fused


def test_requested_score_overrides_and_unknown_is_refused() -> None:
    held = _held_out(residual=0.9, fused=0.95)
    assert choose_primary(held, SPECS, "alm") == "alm"
    with pytest.raises(ExportError, match="not one of"):
        choose_primary(held, SPECS, "bogus")

