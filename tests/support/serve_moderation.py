"""A real HTTP server speaking OpenAI's ``POST /v1/moderations``, flagging texts that contain a word."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ModerationServer:
    """``with ModerationServer(flag_word="attack") as server: server.base_url``; ``server.down()`` makes it 500."""

    def __init__(self, flag_word: str):
        self.flag_word, self.failing, self.seen = flag_word, False, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append(body)
                if outer.failing or self.path != "/v1/moderations":
                    self.send_response(500 if outer.failing else 404)
                    self.end_headers()
                    return
                flagged = outer.flag_word in str(body["input"])
                categories = {"violence": flagged, "harassment": False}
                reply = {"id": "modr-1", "model": body["model"], "results": [{
                    "flagged": flagged, "categories": categories,
                    "category_scores": {k: float(v) for k, v in categories.items()}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ModerationServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
