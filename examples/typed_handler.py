"""The prototype's slot-mode handler: a function taking the raw slot (annotated with a slot
class), registered through a HANDLERS dict under fn_id 0xB000."""

from mpop import MpopApi, TaskResult, TaskSlot196


def some_function_handler(slot: TaskSlot196):
    arg1 = slot.args[0]
    arg2 = slot.args[1] if len(slot.args) > 1 else 1
    result = arg1 * 10 + arg2 + 1
    return TaskResult(success=True, value=result)


HANDLERS = {
    0xB000: some_function_handler,
}


def main():
    app = MpopApi(workers=2, slot_class=TaskSlot196)
    app.register_handlers(handlers_dict=HANDLERS)

    for i in range(100):
        app.enqueue(fn_id=0xB000, args=(i, 0), tsk_id=i)
    result = app.run()
    for r in result.results:
        print(f"task {r.tsk_id}: {r.value}")
    app.shutdown()
    return result.exit_code


if __name__ == "__main__":
    exit(main())
