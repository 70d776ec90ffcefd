"""Work's future without an agent: it is made only when asked for
(get_future), and completes with the operation's result (or raises its
error) whether it was asked for before or after the operation completed,
from the thread that completes it. Prints "WORK OK"."""

import threading


from gpumesh.torch import Work


def done_future(asked_first, error=None):
    w = Work(["result"], "all_reduce", 10.0)
    assert w._future is None, "a future was made before anyone asked for it"
    fut = w.get_future() if asked_first else None
    w._complete(error)
    if fut is None:
        fut = w.get_future()
    assert fut.done(), "the future did not complete with the operation"
    assert w.get_future() is fut, "get_future made a second future"
    return fut


for first in (True, False):
    assert done_future(first).value() == ["result"]
    try:
        done_future(first, "gpumesh: all_reduce failed: peer gone").value()
    except RuntimeError as e:
        assert "peer gone" in str(e), e
    else:
        raise SystemExit(f"a failed operation's future did not raise (asked first: {first})")

# Completion on another thread while futures are being asked for: each
# future completes exactly once (a second set_result would raise).
for _ in range(200):
    w = Work([1], "all_reduce", 10.0)
    t = threading.Thread(target=w._complete, args=(None,))
    t.start()
    fut = w.get_future()
    t.join()
    assert fut.wait() == [1]
    assert w.wait() and w.is_success()

# A Work nobody asks for a future never makes one.
w = Work([1], "all_reduce", 10.0)
w._complete(None)
assert w.wait() and w._future is None
print("WORK OK", flush=True)
