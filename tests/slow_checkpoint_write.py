"""``python tests/slow_checkpoint_write.py <monai.bundle arguments>``: ``python -m monai.bundle`` in which every
``torch.save`` of a file whose name contains ``$SLOW_CHECKPOINT_MATCH`` writes the first half of its bytes,
flushes them to disk, creates the file ``$SLOW_CHECKPOINT_MARKER`` and then waits. A test that sends SIGKILL
once the marker exists kills the run in the middle of that checkpoint write, every time: the one moment a
pre-emption can hit that a kill at a log line never reaches."""

import io
import os
import runpy
import sys
import time

import torch

MATCH, MARKER = os.environ["SLOW_CHECKPOINT_MATCH"], os.environ["SLOW_CHECKPOINT_MARKER"]
save = torch.save


def half_then_wait(obj, f, *args, **kwargs):
    name = os.path.basename(os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
    if MATCH not in name:
        return save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    open(MARKER, "w").close()
    time.sleep(600)
    raise SystemExit("slow_checkpoint_write: not killed within 600 s")


torch.save = half_then_wait
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
