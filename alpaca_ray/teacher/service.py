"""The offline teacher as a cluster service: an actor serving the recordings at an address every node reaches.

A thread in the pipeline's process bound to 127.0.0.1 is reachable only from that process's node; the
generate stage's actors run on other nodes. So the teacher runs in a Ray actor that binds all interfaces
on whatever node it lands on and reports ``http://NODE_IP:PORT/v1``, the node's cluster address. The
recordings travel to it as data (the driver read them), so the replay file need exist only where the
pipeline's driver runs. The actor belongs to the pipeline's driver: it goes when the driver goes.
"""

from __future__ import annotations

from alpaca_ray.teacher.replay import RecordedResponse, ReplayResponder


class ReplayTeacher:
    """Actor body: the recorded responses over the OpenAI protocol on this node's address."""

    def __init__(self, responses: list[RecordedResponse], models: list[str] | None = None):
        from alpaca_ray.cluster.ray_cluster import this_node_address
        from alpaca_ray.openai_server import OpenAIServer

        self.responder = ReplayResponder(responses)
        self.server = OpenAIServer(self.responder, models=models, host="0.0.0.0", port=0).start()
        self.ip = this_node_address()

    def base_url(self) -> str:
        return f"http://{self.ip}:{self.server.port}/v1"

    def served(self) -> int:
        return self.responder.served

    def stop(self) -> int:
        self.server.stop()
        return self.responder.served


def start_replay_service(responses: list[RecordedResponse], models: list[str] | None = None,
                         name: str | None = None):
    """Start the replay teacher on the cluster; returns (actor handle, base URL reachable from every node)."""
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=0)(ReplayTeacher)
    options = {"name": name} if name else {}
    actor = actor_class.options(**options).remote(responses, models)
    return actor, ray.get(actor.base_url.remote(), timeout=120)


def stop_replay_service(actor) -> int:
    """Stop the teacher; returns how many requests it answered."""
    import ray

    try:
        served = ray.get(actor.stop.remote(), timeout=30)
    finally:
        ray.kill(actor)
    return served
