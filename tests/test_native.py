"""gobo.native.kmeans1d_exact: the globally optimal 1-D k-means, checked by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gobo.methods.gobo import cluster_sorted
from gobo.native import kmeans1d_exact


def partition_sse(x: np.ndarray, bounds) -> float:
    """Squared error of contiguous segments x[b[i]:b[i+1]] around their means."""
    return float(sum(((x[a:b] - x[a:b].mean()) ** 2).sum() for a, b in zip(bounds[:-1], bounds[1:])))


def brute_force_sse(x: np.ndarray, k: int) -> float:
    """Best squared error over every split of sorted x into k non-empty contiguous runs
    (in 1-D an optimal clustering of sorted data is always contiguous)."""
    n = x.size
    return min(partition_sse(x, (0, *cuts, n)) for cuts in itertools.combinations(range(1, n), k - 1))


def nearest_sse(x: np.ndarray, c: np.ndarray) -> float:
    """Squared error with every value sent to its nearest centroid."""
    return float(np.min((x[:, None] - c[None, :]) ** 2, axis=1).sum())


def small_cases():
    rng = np.random.default_rng(2020)
    for n in range(1, 15):
        for k in range(1, min(4, n) + 1):
            yield n, k, np.sort(rng.standard_normal(n))
            yield n, k, np.sort(rng.integers(-3, 4, size=n).astype(np.float64))  # ties and repeats


@pytest.mark.parametrize("n, k, x", [pytest.param(n, k, x, id=f"n{n}-k{k}-{i % 2}") for i, (n, k, x) in enumerate(small_cases())])
def test_matches_brute_force(n: int, k: int, x: np.ndarray) -> None:
    cent, bounds = kmeans1d_exact(x, k)
    assert cent.shape == (k,) and bounds.shape == (k + 1,)
    assert bounds[0] == 0 and bounds[-1] == n
    assert np.all(np.diff(bounds) >= 1), "every cluster is non-empty"
    assert np.all(np.diff(cent) >= 0), "centroids ascend"
    means = [x[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(cent, means, rtol=1e-12, atol=1e-12)
    best = brute_force_sse(x, k)
    assert partition_sse(x, bounds) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_constant_data_and_k_equal_n() -> None:
    cent, bounds = kmeans1d_exact(np.full(10, 0.25), 3)
    assert np.all(cent == 0.25) and bounds.tolist()[0] == 0 and bounds.tolist()[-1] == 10
    x = np.array([-2.0, -1.0, 0.5, 3.0])
    cent, bounds = kmeans1d_exact(x, 4)
    assert np.array_equal(cent, x) and bounds.tolist() == [0, 1, 2, 3, 4]


def large_arrays():
    rng = np.random.default_rng(8)
    n = 5000
    yield "normal", rng.standard_normal(n)
    yield "laplace", rng.laplace(scale=0.05, size=n)  # heavy-tailed, like encoder weights
    yield "mixture", np.concatenate([rng.normal(-1.0, 0.1, n // 2), rng.normal(2.0, 0.5, n - n // 2)])
    yield "uniform-offset", 1e3 + rng.random(n)  # large mean: prefix sums must stay accurate


@pytest.mark.parametrize("name, x", list(large_arrays()), ids=lambda v: v if isinstance(v, str) else "")
def test_never_worse_than_the_iterative_methods(name: str, x: np.ndarray) -> None:
    x = np.sort(x)
    k = 8
    cent, bounds = kmeans1d_exact(x, k)
    exact = nearest_sse(x, cent)
    assert exact <= partition_sse(x, bounds) * (1 + 1e-9)  # reassigning to nearest can only help
    for method in ("lloyd", "l1"):
        other = nearest_sse(x, cluster_sorted(x, k, method))
        assert exact <= other * (1 + 1e-9), (method, exact, other)
    np.testing.assert_allclose(cluster_sorted(x, k, "exact"), cent, rtol=0, atol=0)


@pytest.mark.parametrize("n, k", [(3, 4), (1, 2), (0, 1), (5, 0), (5, -1)])
def test_bad_arguments(n: int, k: int) -> None:
    with pytest.raises(ValueError):
        kmeans1d_exact(np.arange(n, dtype=np.float64), k)
