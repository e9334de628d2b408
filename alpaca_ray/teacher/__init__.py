"""The offline teacher: recorded self-instruct responses served over the OpenAI protocol.

It lets the whole pipeline run with no API key and no network (the quick start, CI), and it replays a
generate run's raw journal (``OUTPUT/raw/*.jsonl``) so a paid-for run can be reproduced at zero cost.
"""

from alpaca_ray.teacher.config import TeacherConfig
from alpaca_ray.teacher.replay import RecordedResponse, ReplayResponder, read_replay, start_teacher

__all__ = ["RecordedResponse", "ReplayResponder", "TeacherConfig", "read_replay", "start_teacher"]
