"""A smoke test of an installed mpop: map and submit under every start method.

Run by tests/packaging/test_dist.py in a fresh virtualenv, and by cibuildwheel on each
wheel it builds (pyproject.toml, [tool.cibuildwheel]). It must run from outside the source
tree, so that `import mpop` finds the installed package."""

import os
import sys

import mpop


def square(x):
    return x * x


def main() -> int:
    here = os.path.realpath(mpop.__file__)
    if not here.startswith(os.path.realpath(sys.prefix)):
        print(f"mpop was imported from {here}, not from the environment {sys.prefix}", file=sys.stderr)
        return 1
    for method in ("spawn", "fork", "forkserver"):
        # A small pool: container images often give /dev/shm only 64 MiB.
        with mpop.MpopApi(workers=2, start_method=method, pool_bytes=8 << 20) as app:
            assert list(app.map(square, range(1000))) == [x * x for x in range(1000)], method
            assert app.submit(pow, 2, 10).result(timeout=60) == 1024, method
            assert app.submit(square, 12).result(timeout=60) == 144, method
    print("ok", mpop.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
