"""Load shapes for the locustfile: a ladder of stages (users held for a while each).

Load it next to the locustfile; the shape then drives the user count and -u/-r/-t are ignored:

    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless -H http://127.0.0.1:8000 \
        --stages 60s:1,60s:4,60s:16 --csv reports/ladder

A stage is DURATION:USERS[:SPAWN_RATE], DURATION as 30s, 2m, 1h or plain seconds; SPAWN_RATE
(users per second) defaults to USERS, i.e. the stage is reached within a second. The test ends
after the last stage. PREFIX_stats_history.csv has the user count per row, so each stage can be
read on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from locust import LoadTestShape, events

try:
    from loadtest.stages import parse_stages, stage_at
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest.stages import parse_stages, stage_at

DEFAULT_STAGES = "60s:1,60s:4,60s:16,60s:32"


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    parser.add_argument("--stages", env_var="LOCUST_STAGES", default=DEFAULT_STAGES,
                        help="load ladder for StagesShape: DURATION:USERS[:SPAWN_RATE],...")


class StagesShape(LoadTestShape):
    """Holds each stage's user count for its duration, in order, then stops the test."""

    def tick(self) -> tuple[int, float] | None:
        if not hasattr(self, "stages"):
            self.stages = parse_stages(self.runner.environment.parsed_options.stages)
        stage = stage_at(self.stages, self.get_run_time())
        return None if stage is None else (stage.users, stage.spawn_rate)
