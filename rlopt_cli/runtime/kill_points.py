"""A test hook for crash safety: `RLOPT_TEST_KILL_AT=<point>` makes the process kill -9 itself at that point.

The trainer names its phases (`startup`, `step-0`, `step-N` after step N is logged, `checkpoint-N` inside the
save of checkpoint N, once its files are written and before the rename; in a sharded run also `shard-N`, on every
rank inside DCP's save of checkpoint N, once the rank's own shard file is written and before rank 0 gathers the
ranks' results and writes the metadata); tests kill a real run at each one and check that rerunning it ends
bitwise equal to an uninterrupted run. `<point>` kills every process of a sharded run that reaches it;
`<point>@rank<R>` (e.g. `shard-4@rank1`) kills rank R alone, as a crashed or OOM-killed rank would die. The
variable is read here only; unset, this costs one dict lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "RLOPT_TEST_KILL_AT"


def kill_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted is not None and wanted in (name, f"{name}@rank{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
