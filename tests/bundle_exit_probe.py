"""``python tests/bundle_exit_probe.py run ...`` is ``python -m monai.bundle run ...`` that, as the very last
thing before the interpreter shuts down, prints how many ``DistributedDataParallel`` modules are still alive.

A DDP module keeps its gloo process group alive; one freed during interpreter shutdown can abort the process
("terminate called without an active exception") after a run that finished, roughly once in 50 two-process
runs. ``engines.free_at_exit`` frees them while the interpreter is whole, and this count, 0 on every rank, checks
it on every run instead of waiting for the rare abort.

With ``STACKS_AFTER_ENV`` set to a number of seconds, a rank still running then prints every thread's Python stack
(and keeps running): a two-process run that hangs shows where each rank waits before the test's timeout kills it.
"""

import atexit
import faulthandler
import gc
import os
import runpy
import sys

MARK = "DistributedDataParallel modules alive at exit:"
STACKS_AFTER_ENV = "HYBRIDMIM_STACKS_AFTER"


def _count_alive() -> None:
    from torch.nn.parallel import DistributedDataParallel

    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    # one write(2) of a short line: both ranks share the pipe, and print's separate writes of its arguments
    # interleaved with the other rank's (seen in CI: "...at exit:...at exit: 0\n 0")
    os.write(sys.stdout.fileno(), f"{MARK} {alive}\n".encode())


if __name__ == "__main__":
    if os.environ.get(STACKS_AFTER_ENV):
        faulthandler.dump_traceback_later(float(os.environ[STACKS_AFTER_ENV]), exit=False)
    atexit.register(_count_alive)  # registered first, so it runs last
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
