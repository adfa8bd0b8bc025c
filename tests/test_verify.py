"""Parity metrics on hand-made numbers: the gate must pass what matches and fail what does not."""

from __future__ import annotations

import numpy as np
import pytest

from clipexport.errors import ParityError
from clipexport.recipes import Tolerance
from clipexport.verify import TowerParity, compare

TOL = Tolerance(cosine_min=0.99999, max_rel_err=1e-4)


def test_identical_embeddings_are_perfect():
    ref = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    result = compare(ref, ref.copy(), 4)
    assert result.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert result.max_abs_err == 0.0 and result.max_rel_err == 0.0 and result.finite


def test_relative_error_is_per_embedding_scale():
    ref = np.array([[10.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    cand = ref.copy()
    cand[1, 1] += 2e-4  # 2e-4 of a row whose largest entry is 1
    result = compare(ref, cand, 2)
    assert result.max_abs_err == pytest.approx(2e-4)
    assert result.max_rel_err == pytest.approx(2e-4)
    parity = TowerParity("image", "test", "fp32", TOL, [result])
    assert not parity.passed  # 2e-4 > 1e-4
    assert "FAILED" in parity.summary() and "max_rel_err 0.0002" in parity.summary()


def test_one_bad_row_fails_cosine():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 32))
    cand = ref.copy()
    cand[2] = rng.standard_normal(32)  # an unrelated embedding
    result = compare(ref, cand, 3)
    assert result.cosine_min < 0.5
    assert not TowerParity("text", "test", "fp32", TOL, [result]).passed


def test_non_finite_output_fails():
    ref = np.ones((2, 4))
    cand = ref.copy()
    cand[0, 0] = np.inf
    result = compare(ref, cand, 2)
    assert not result.finite
    assert not TowerParity("image", "test", "fp32", TOL, [result]).passed


def test_shape_mismatch_is_an_error():
    with pytest.raises(ParityError, match="shape"):
        compare(np.ones((2, 4)), np.ones((2, 5)), 2)


def test_worst_batch_decides():
    good = compare(np.ones((1, 4)), np.ones((1, 4)), 1)
    bad = compare(np.ones((1, 4)), np.ones((1, 4)) * (1 + 1e-3), 1)
    parity = TowerParity("image", "test", "fp32", TOL, [good, bad])
    assert parity.max_rel_err == pytest.approx(1e-3) and not parity.passed
