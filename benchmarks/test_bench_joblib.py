"""joblib.Parallel on the mpop backend and on joblib's default backend, loky, side by side
(pytest-benchmark): 100,000 tiny delayed calls, and a scikit-learn GridSearchCV. Each
backend is started and warmed up first; `python -m mpop bench --only joblib` gives the same
pairs with joblib's in-process floor beside them."""

from __future__ import annotations

import pytest

pytest.importorskip("joblib")
pytest.importorskip("sklearn")

from joblib import Parallel, delayed, parallel_config  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402

from mpop._workloads import inc  # noqa: E402
from mpop.joblib import MpopBackend  # noqa: E402

N_JOBS = 2
N = 100_000


@pytest.fixture(scope="module")
def backends():
    mpop_backend = MpopBackend()
    for b in (mpop_backend, "loky"):
        with parallel_config(backend=b, n_jobs=N_JOBS):
            Parallel()(delayed(inc)(i) for i in range(1000))
    yield {"mpop": mpop_backend, "loky": "loky"}
    mpop_backend.terminate_app()


@pytest.fixture(scope="module")
def data():
    return make_classification(n_samples=4000, n_features=20, random_state=0)


def tiny_calls(backend) -> None:
    with parallel_config(backend=backend, n_jobs=N_JOBS):
        out = Parallel()(delayed(inc)(i) for i in range(N))
    assert out[-1] == N


def grid_search(backend, data) -> None:
    X, y = data
    with parallel_config(backend=backend, n_jobs=N_JOBS):
        GridSearchCV(LogisticRegression(max_iter=500), {"C": [0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]}, cv=5).fit(X, y)


@pytest.mark.parametrize("side", ["mpop", "loky"])
def test_joblib_tiny_calls(benchmark, backends, record, side):
    benchmark.pedantic(lambda: tiny_calls(backends[side]), rounds=3, warmup_rounds=1)
    record("joblib 100k tiny calls", side, benchmark)


@pytest.mark.parametrize("side", ["mpop", "loky"])
def test_joblib_grid_search(benchmark, backends, data, record, side):
    benchmark.pedantic(lambda: grid_search(backends[side], data), rounds=5, warmup_rounds=1)
    record("GridSearchCV 40 fits", side, benchmark)
