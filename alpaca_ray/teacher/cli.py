"""``alpaca-ray teacher --replay FILE``: an offline teacher for runs with no API key and no network."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.teacher.config import TeacherConfig
from alpaca_ray.teacher.replay import start_teacher

EPILOG = """\
Any JSONL whose lines have 'text' (and optionally 'finish_reason') can be replayed, so a generate
run records itself as it goes: its raw journal OUTPUT/raw/*.jsonl is written before parsing, and
`alpaca-ray teacher --replay OUTPUT/raw/` serves those same answers again, at zero API cost.
Point a stage at it with --teacher-base-url http://HOST:PORT/v1 (any API key is accepted).
"""


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray teacher", "Serve recorded teacher responses over the OpenAI API "
                         "(completions and chat), in order, cycling.", TeacherConfig)
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)

    def body() -> int:
        config = config_from_args(TeacherConfig, args, section="teacher")
        server = start_teacher(config.replay, config.host, config.port, config.model)
        stop = threading.Event()
        # The server runs on its own thread; the main thread only waits for a signal, so shutdown is clean.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        count = len(server.responder.responses)
        print(f"offline teacher: replaying {count} recorded responses from {config.replay}\n"
              f"base URL: {server.base_url}  (Ctrl-C to stop)", flush=True)
        stop.wait()
        server.stop()
        print(f"offline teacher stopped after {server.responder.served} requests", file=sys.stderr, flush=True)
        return 0

    return run_cli(body)
