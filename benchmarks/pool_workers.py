"""What the benchmarks' worker processes share and that must import fast (no training stack): a worker ends with its
benchmark."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this process (a pool worker) soon after `parent` is gone: a killed benchmark (SIGTERM, SIGKILL, Ctrl-C of
    a shell job) would otherwise leave its spawned workers training on, busying the cores of the next timing. A
    daemon thread polls this process's parent pid."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
