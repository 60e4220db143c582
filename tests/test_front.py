"""Multi-objective utilities: minimisation form, non-dominated filter, reference point, hypervolume."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.front import (
    hypervolume,
    non_dominated,
    pareto_front_table,
    reference_point,
    reference_point_from_bounds,
    to_minimization,
)


def test_to_minimization_negates_maximised_and_marks_failures():
    F = to_minimization([[0.9, 3.0], None, [0.5, None]], ["maximize", "minimize"])
    assert F.shape == (3, 2)
    assert F[0].tolist() == [-0.9, 3.0]
    assert np.isnan(F[1]).all() and np.isnan(F[2, 1]) and F[2, 0] == -0.5
    assert to_minimization([], ["max", "min"]).shape == (0, 2)


def test_non_dominated_hand_cases():
    F = np.array([
        [1.0, 5.0],   # front
        [2.0, 3.0],   # front
        [3.0, 3.0],   # dominated by [2, 3] (weakly: equal in one, worse in the other)
        [4.0, 1.0],   # front
        [4.0, 4.0],   # dominated
        [2.0, 3.0],   # duplicate of a front point: stays
        [np.nan, 0.0],  # failed: excluded, dominates nothing
        [0.0, np.inf],  # failed
    ])
    assert non_dominated(F).tolist() == [True, True, False, True, False, True, False, False]
    assert non_dominated(np.empty((0, 2))).tolist() == []
    assert non_dominated(np.array([[1.0], [0.5], [0.5]])).tolist() == [False, True, True]
    # three objectives: a trade-off in the third keeps a point
    F3 = np.array([[1, 1, 1], [0, 2, 2], [2, 2, 0], [2, 2, 2]], dtype=float)
    assert non_dominated(F3).tolist() == [True, True, True, False]


def test_non_dominated_matches_brute_force():
    rng = np.random.default_rng(0)
    F = rng.integers(0, 5, size=(60, 3)).astype(float)
    expect = [not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i]) for j in range(len(F)))
              for i in range(len(F))]
    assert non_dominated(F).tolist() == expect


def test_hypervolume_known_2d():
    ref = [4.0, 4.0]
    # staircase: (1,3), (2,2), (3,1) w.r.t. (4,4): 3*1 + 2*1 + 1*1 = 6
    F = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    assert hypervolume(F, ref) == pytest.approx(6.0)
    # dominated points, failures and points beyond the reference add nothing
    G = np.vstack([F, [[3.0, 3.0], [np.nan, 0.0], [5.0, 0.0], [0.0, 4.0]]])
    assert hypervolume(G, ref) == pytest.approx(6.0)
    assert hypervolume(np.array([[0.0, 0.0]]), ref) == pytest.approx(16.0)
    assert hypervolume(np.empty((0, 2)), ref) == 0.0


def test_reference_points():
    F = np.array([[0.0, 10.0], [1.0, 0.0], [np.nan, 100.0]])
    assert reference_point(F, margin=0.1).tolist() == pytest.approx([1.1, 11.0])
    assert reference_point(np.array([[2.0, -3.0]]), margin=0.5).tolist() == pytest.approx([3.0, -1.5])
    with pytest.raises(ValueError):
        reference_point(np.array([[np.nan, 1.0]]))
    # accuracy in [0, 1] maximised, cost in [0, 10] minimised
    ref = reference_point_from_bounds([(0.0, 1.0), (0.0, 10.0)], ["maximize", "minimize"], margin=0.1)
    assert ref.tolist() == pytest.approx([0.1, 11.0])


def test_pareto_front_table():
    rows = pareto_front_table([10, 11, 12, 13], [[0.9, 5.0], [0.5, 1.0], [0.4, 2.0], None],
                              ["maximize", "minimize"], names=["acc", "cost"])
    assert rows == [{"key": 10, "acc": 0.9, "cost": 5.0}, {"key": 11, "acc": 0.5, "cost": 1.0}]
