"""CPU time of whole processes on this machine, in nanoseconds, from
/proc/PID/task/*/schedstat (every thread's time on a CPU, exact to the
nanosecond, unlike the clock ticks of /proc/PID/stat). The benchmarks use
it to give the agent's and the ranks' CPU per operation, which a loaded
machine does not move as it moves wall times."""

import os


def cpu_ns(pids):
    """Sum of the CPU time of every thread of every process in pids (a
    thread that has exited is no longer counted)."""
    total = 0
    for pid in pids:
        base = f"/proc/{pid}/task"
        try:
            tids = os.listdir(base)
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"{base}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return total
