"""The node's own schedule: its once-a-second housekeeping spread over the second."""

import itertools
from pathlib import Path

from oobwatch.config import load
from oobwatch.serve import HOUSEKEEPING_SECONDS, start
from support import Receiver, node_config


async def test_housekeeping_jobs_each_run_at_their_own_phase_of_the_second(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = load(
        node_config(tmp_path, receiver.url("json", "/p"), extra="[heartbeat]\nenabled = false\n")
    )
    node = await start(config)
    try:
        named = {
            f"{job.func.__qualname__}({', '.join(arg.__name__ for arg in job.args)})": job
            for job in node.scheduler.get_jobs()
        }
        housekeeping = [
            "Pager.timed_work()",
            "_on_loop(dispatch_soon)",
            "_on_loop(send_soon)",
            "_schedule.<locals>.checkpoint()",
            "_schedule.<locals>.refresh()",
        ]
        every_tick = [named[name] for name in housekeeping]
        assert {job.trigger.interval_length for job in every_tick} == {HOUSEKEEPING_SECONDS}
        starts = sorted(job.next_run_time.timestamp() for job in every_tick)
        gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
        assert min(gaps) >= 0.9 * HOUSEKEEPING_SECONDS / len(every_tick)
        assert starts[-1] - starts[0] < HOUSEKEEPING_SECONDS
    finally:
        await node.stop()
