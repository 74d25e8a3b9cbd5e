"""Long-running use: submit() returns concurrent.futures.Future objects, map() streams
results, and as_completed() works on mpop futures like on any others."""

from concurrent.futures import as_completed

import mpop


def square(x: int) -> int:
    return x * x


def main():
    with mpop.MpopApi(workers=2) as app:
        futures = {app.submit(square, i): i for i in range(10)}
        for fut in as_completed(futures):
            print(f"square({futures[fut]}) = {fut.result()}")

        print("map:", list(app.map(square, range(10))))
        print("unordered sum:", sum(app.map(square, range(1000), ordered=False)))
        print("two iterables:", list(app.map(pow, [2, 3, 4], [5, 2, 3])))
    return 0


if __name__ == "__main__":
    exit(main())
