"""The prototype's "Basic Usage" program, unchanged except for the import (and the
prototype's `if name == "main"` typo): 100 INCREMENT tasks with debug logging on."""

from mpop import MpopApi, ProcTaskFnID


def main():
    app = MpopApi(
        debug=True,
        debug_delay=0.05,
    )
    app.print_status(config=True, queue=True, workers=True)

    for i in range(100):
        app.enqueue(
            fn_id=ProcTaskFnID.INCREMENT,
            args=(i * 10, 1),
            tsk_id=i + 1,
        )
    result = app.run()
    for r in result.results:
        print(f"task {r.tsk_id}: {r.value}")
    app.shutdown()
    return result.exit_code


if __name__ == "__main__":
    exit(main())
