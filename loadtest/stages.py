"""Load ladders for locust's StagesShape (loadtest/shapes.py), kept free of locust imports.

NOTE: importing locust monkey-patches the whole process (gevent), so code that tests or tools
import in-process lives here and not in shapes.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    duration_s: float
    users: int
    spawn_rate: float


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h)?", text.strip().lower())
    if not match:
        raise ValueError(f"bad duration {text!r}; expected e.g. 30s, 2m, 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def parse_stages(text: str) -> list[Stage]:
    """'30s:1,2m:8:2' -> [Stage(30, 1, 1.0), Stage(120, 8, 2.0)]; raises ValueError."""
    stages = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (2, 3):
            raise ValueError(f"bad stage {item!r}; expected DURATION:USERS[:SPAWN_RATE]")
        users = int(fields[1])
        spawn_rate = float(fields[2]) if len(fields) == 3 else float(max(users, 1))
        if users < 0 or spawn_rate <= 0:
            raise ValueError(f"bad stage {item!r}: users must be >= 0 and spawn rate > 0")
        stages.append(Stage(parse_duration(fields[0]), users, spawn_rate))
    if not stages:
        raise ValueError("no stages given")
    return stages


def stage_at(stages: list[Stage], elapsed_s: float) -> Stage | None:
    """The stage running `elapsed_s` after the start, or None once all are over."""
    end = 0.0
    for stage in stages:
        end += stage.duration_s
        if elapsed_s < end:
            return stage
    return None
