"""The blind human rating page, as Alpaca's authors ran theirs: a Ray Serve app with its own FastAPI.

Each rater sees every pair once, in their own random order, with the two answers in a random position
(fixed per rater and item, so a reload shows the same thing). Names never reach the page: it gets
"Response 1" and "Response 2", and the server maps the rater's choice back to model A or B before
storing it in SQLite (:mod:`alpaca_ray.evaluate.ratings`). The report reads the same file.

The page is one deployment with exactly one replica, which makes it the database's single writer (two
replicas on two nodes would each write a file of their own). It runs on the node of the process that
deployed it, the one that writes the report from the same file when the page is taken down.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real request-body type of ``rate``
# (a string annotation is not resolved once Serve has pickled the class), or it reads it as a query.
import hashlib

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from ray import serve

from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.cluster.services import serve_app_url
from alpaca_ray.evaluate.ratings import RatingStore

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Which response is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
 .pair{display:flex;gap:1em} .response{flex:1;border:1px solid #ccc;border-radius:6px;padding:.8em;white-space:pre-wrap}
 .instruction{background:#f4f4f4;border-radius:6px;padding:.8em;white-space:pre-wrap}
 .choices{margin:1em 0;display:flex;gap:1em} button{font-size:1em;padding:.5em 1.2em;cursor:pointer}
 .muted{color:#666;font-size:.9em}
</style></head>
<body>
<h1>Which response is better?</h1>
<p class="muted">Read the instruction and both responses, then choose the one that follows the instruction
better, or a tie. The responses come from two systems shown in a random order.</p>
<section id="login">
 <label>Your rater id: <input id="rater" autocomplete="off" maxlength="64"></label>
 <button id="start">Start rating</button>
</section>
<section id="task" hidden>
 <p class="muted" id="progress"></p>
 <h3>Instruction</h3><div class="instruction" id="instruction"></div>
 <div id="input-block" hidden><h3>Input</h3><div class="instruction" id="input"></div></div>
 <div class="pair">
  <div><h3>Response 1</h3><div class="response" id="response-1"></div></div>
  <div><h3>Response 2</h3><div class="response" id="response-2"></div></div>
 </div>
 <div class="choices">
  <button id="choose-1">Response 1 is better</button>
  <button id="choose-tie">Tie</button>
  <button id="choose-2">Response 2 is better</button>
 </div>
</section>
<section id="done" hidden><h2>All pairs rated. Thank you!</h2></section>
<script>
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
let rater = localStorage.getItem("alpaca-ray-rater") || "";
let current = null;
const $ = (id) => document.getElementById(id);
$("rater").value = rater;
async function next() {
  const response = await fetch(base + "api/next?rater=" + encodeURIComponent(rater));
  const data = await response.json();
  $("login").hidden = true;
  if (data.done) { $("task").hidden = true; $("done").hidden = false; return; }
  current = data;
  $("progress").textContent = "Rater " + rater + ": pair " + (data.rated + 1) + " of " + data.total;
  $("instruction").textContent = data.instruction;
  $("input").textContent = data.input;
  $("input-block").hidden = !data.input;
  $("response-1").textContent = data.responses[0];
  $("response-2").textContent = data.responses[1];
  $("task").hidden = false;
}
async function choose(choice) {
  const body = {rater: rater, item_id: current.item_id, choice: choice};
  const response = await fetch(base + "api/rate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify(body)});
  if (!response.ok) { alert("could not save: " + await response.text()); return; }
  await next();
}
$("start").onclick = () => {
  rater = $("rater").value.trim();
  if (!rater) { alert("enter a rater id"); return; }
  localStorage.setItem("alpaca-ray-rater", rater);
  next();
};
$("choose-1").onclick = () => choose("1");
$("choose-2").onclick = () => choose("2");
$("choose-tie").onclick = () => choose("tie");
</script></body></html>
"""


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def shown_order(seed: int, rater: str, item_id: str) -> str:
    """Which model a rater sees first for an item ("ab" or "ba"): random, but the same on every visit."""
    return "ab" if _hash(seed, "order", rater, item_id) % 2 == 0 else "ba"


def rater_sequence(seed: int, rater: str, item_ids: list[str]) -> list[str]:
    """The order a rater meets the pairs in: a shuffle of its own, so raters do not tire on the same items."""
    return sorted(item_ids, key=lambda item_id: _hash(seed, "sequence", rater, item_id))


def choice_to_model(choice: str, order: str) -> str:
    """A rater's positional choice ("1", "2", "tie") as the model it prefers ("A", "B", "tie")."""
    if choice == "tie":
        return "tie"
    first, second = ("A", "B") if order == "ab" else ("B", "A")
    return first if choice == "1" else second


class RatingIn(BaseModel):
    rater: str = Field(min_length=1, max_length=64)
    item_id: str
    choice: str = Field(pattern="^(1|2|tie)$")


app = FastAPI(title="alpaca-ray human evaluation")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class RatingPage:
    """Serves the page and its small JSON API; one replica, the ratings database's only writer.

    Never scale it out: each replica would write the database on its own node's disk (see the module's
    docstring); :func:`deploy_rating_page` pins it to one replica on the deploying process's node.
    """

    def __init__(self, pairs: list[dict], db_path: str, seed: int = 0):
        self.pairs = {pair["id"]: pair for pair in pairs}
        self.item_ids = list(self.pairs)
        self.store = RatingStore(db_path)
        self.seed = seed

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return PAGE

    @app.get("/-/healthz")
    def healthz(self) -> dict:
        return {"ok": True, "pairs": len(self.pairs)}

    @app.get("/api/next")
    def next_pair(self, rater: str) -> dict:
        rater = rater.strip()
        if not rater:
            raise HTTPException(422, "rater id is empty")
        rated = self.store.rated_items(rater)
        todo = [i for i in rater_sequence(self.seed, rater, self.item_ids) if i not in rated]
        done = len(self.item_ids) - len(todo)
        if not todo:
            return {"done": True, "rated": done, "total": len(self.item_ids)}
        pair = self.pairs[todo[0]]
        first, second = ("answer_a", "answer_b") if shown_order(self.seed, rater, pair["id"]) == "ab" else (
            "answer_b", "answer_a")
        return {"done": False, "item_id": pair["id"], "instruction": pair["instruction"], "input": pair["input"],
                "responses": [pair[first], pair[second]], "rated": done, "total": len(self.item_ids)}

    @app.post("/api/rate")
    def rate(self, rating: RatingIn) -> dict:
        rater = rating.rater.strip()
        if not rater:  # as /api/next: a blank id would pool everyone's ratings under ""
            raise HTTPException(422, "rater id is empty")
        if rating.item_id not in self.pairs:
            raise HTTPException(404, f"no pair {rating.item_id!r}")
        order = shown_order(self.seed, rater, rating.item_id)
        self.store.record(rating.item_id, rater, choice_to_model(rating.choice, order), order)
        return {"ok": True}

    @app.get("/api/progress")
    def progress(self) -> dict:
        ratings = self.store.ratings()
        return {"pairs": len(self.pairs), "ratings": len(ratings), "raters": len({r.rater_id for r in ratings})}


def deploy_rating_page(pairs: list[dict], db_path: str, seed: int = 0, app_name: str = "alpaca-ray-evaluate",
                       route_prefix: str = "/", host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the page (waiting until it is healthy) and return its URL.

    Serve has one HTTP proxy per cluster: when Serve already runs there, the page joins it under
    ``route_prefix`` and the proxy's own host and port apply, not ``host``/``port``.
    """
    ray = ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    # Pinned to this node (its "node:IP" resource; 0.001 is a placement rule, not a reservation): the page
    # writes db_path on this node's disk, and this process reads it from there for the report.
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    page = RatingPage.options(num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": here})
    serve.run(page.bind(pairs, db_path, seed), name=app_name, route_prefix=route_prefix)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = serve_app_url(app_name) or f"http://{shown_host}:{port}{route_prefix.rstrip('/')}"
    return url + "/"
