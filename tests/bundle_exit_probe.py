"""``python tests/bundle_exit_probe.py run ...`` is ``python -m monai.bundle run ...`` that, as the very last
thing before the interpreter shuts down, prints how many ``DistributedDataParallel`` modules are still alive.

A DDP module keeps its gloo process group alive; one freed during interpreter shutdown can abort the process
("terminate called without an active exception") after a run that finished, roughly once in 50 two-process
runs. ``engines.free_at_exit`` frees them while the interpreter is whole, and this count, 0 on every rank, checks
it on every run instead of waiting for the rare abort.

``STACKS_SIGNAL`` makes a rank print every thread's Python stack (and keep running): a test whose two-process run
outlives its timeout sends it to each rank before killing them, so a hang shows where each rank waited.
"""

import atexit
import faulthandler
import gc
import os
import runpy
import signal
import sys

MARK = "DistributedDataParallel modules alive at exit:"
STACKS_SIGNAL = signal.SIGUSR1


def _count_alive() -> None:
    from torch.nn.parallel import DistributedDataParallel

    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    # one write(2) of a short line: both ranks share the pipe, and print's separate writes of its arguments
    # interleaved with the other rank's (seen in CI: "...at exit:...at exit: 0\n 0")
    os.write(sys.stdout.fileno(), f"{MARK} {alive}\n".encode())


if __name__ == "__main__":
    # on a signal, not on a timer: faulthandler reads the other threads' frames without the GIL, which can crash a
    # thread caught mid-import (a timed dump at 10 s killed a healthy rank with SIGSEGV in CI); a signal comes only
    # once the run has already failed its timeout
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    atexit.register(_count_alive)  # registered first, so it runs last
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
