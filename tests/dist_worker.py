"""What the distributed tests launch with torchrun: ``preftune`` itself, with one event injected on
request: FAIL_ON_RANK=R:STEP makes rank R raise during optimizer step STEP (or hang there, with
FAIL_BY_HANGING=1); SIGTERM_AFTER_STEP=N
makes rank 0 send SIGTERM to torchrun (its parent) after step N, as a cluster's preemption would."""

import os
import signal
import sys
import time

from preftune.cli import main

if os.environ.get("FAIL_ON_RANK"):
    from preftune.training import loop

    fail_rank, fail_step = (int(x) for x in os.environ["FAIL_ON_RANK"].split(":"))
    step_fn, calls = loop.clip_and_step, []

    def failing_clip_and_step(*args, **kwargs):
        calls.append(1)
        if int(os.environ["RANK"]) == fail_rank and len(calls) == fail_step:
            if os.environ.get("FAIL_BY_HANGING"):
                time.sleep(3600)  # a rank that stops answering
            raise RuntimeError(f"injected fault on rank {fail_rank} at step {fail_step}")
        return step_fn(*args, **kwargs)

    loop.clip_and_step = failing_clip_and_step

if os.environ.get("SIGTERM_AFTER_STEP"):
    from preftune.memory.plan import MemoryPlan

    after_step, steps = MemoryPlan.after_step, []

    def preempt_after_step(self):
        after_step(self)
        steps.append(1)
        if os.environ.get("RANK") == "0" and len(steps) == int(os.environ["SIGTERM_AFTER_STEP"]):
            os.kill(os.getppid(), signal.SIGTERM)

    MemoryPlan.after_step = preempt_after_step

if __name__ == "__main__":
    sys.argv[0] = "preftune"
    main()
