"""A test hook for crash safety: `RLOPT_TEST_KILL_AT=<point>` makes the process kill -9 itself at that point.

The trainer names its phases (`startup`, `step-0`, `step-N` after step N is logged, `checkpoint-N` inside the
save of checkpoint N, once its files are written and before the rename); tests kill a real run at each one and
check that rerunning it ends bitwise equal to an uninterrupted run. The variable is read here only; unset, this
costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "RLOPT_TEST_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
