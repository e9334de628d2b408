"""Long-running apps on the cluster: staying up until told to stop, and where a Serve app answers.

- :func:`wait_for_stop_signal`: the foreground mode of ``alpaca-ray serve``, ``evaluate --human`` and the
  pipeline's served model: block until SIGINT (Ctrl-C) or SIGTERM (``ray job stop``, a container stop).
- :func:`serve_app_url` (from the running Serve controller) and :func:`deployed_app_url` (from a cluster's
  dashboard, for a client outside it): the URL Serve really serves an app at, which may differ from the one
  asked for, since a cluster has one proxy configuration and the first app deployed sets it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping

#: Serve's ``HTTPOptions`` defaults, which the controller leaves out of its details when they were not set.
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def wait_for_stop_signal(poll_s: float = 1.0, on_ready: Callable[[], object] | None = None) -> int:
    """Block until SIGINT or SIGTERM arrives; return which one. Call it from the main thread.

    ``on_ready`` runs once the handlers are in place: a "press Ctrl-C to stop" printed there is true
    (printed before, a Ctrl-C in between would still raise KeyboardInterrupt). The previous handlers are
    put back before returning, so a second Ctrl-C during the shutdown that follows behaves as usual. The
    wait polls every ``poll_s`` seconds so the main thread regularly returns to the interpreter, where
    Python runs signal handlers.
    """
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_ready is not None:
            on_ready()
        while not stop.wait(poll_s):
            pass
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    return received[0]


def app_url_from_details(details: Mapping, app_name: str, host: str | None = None,
                         local_ip: str | None = None) -> str | None:
    """The base URL (no trailing slash) of ``app_name`` from Serve's instance details, or None.

    ``details`` is what the controller (or the dashboard's ``/api/serve/applications/``) reports. ``host``
    is the host clients should use; without it, the proxy's bound host is used, and for a wildcard bind
    (``0.0.0.0``) the IP of a node running a proxy: this node's (``local_ip``) when it runs one, since
    then the URL works here too, else the first one. None when the app is not deployed, has no HTTP
    route, or the proxies are disabled.
    """
    app = (details.get("applications") or {}).get(app_name)
    if not app or app.get("route_prefix") is None or details.get("proxy_location") == "Disabled":
        return None
    http = details.get("http_options") or {}
    port = http.get("port", DEFAULT_HTTP_PORT)
    if not host:
        host = http.get("host", DEFAULT_HTTP_HOST)
        if host in _WILDCARD_HOSTS:
            proxy_ips = sorted({p.get("node_ip") for p in (details.get("proxies") or {}).values() if p.get("node_ip")})
            host = local_ip if local_ip in proxy_ips or not proxy_ips else proxy_ips[0]
            host = host or DEFAULT_HTTP_HOST
    if ":" in host and not host.startswith("["):  # an IPv6 address in a URL goes in brackets
        host = f"[{host}]"
    return f"http://{host}:{port}{app['route_prefix'].rstrip('/')}"


def serve_app_url(app_name: str, host: str | None = None) -> str | None:
    """The URL ``app_name`` answers at, from the Serve controller of the cluster this process joined.

    None when Ray is not initialised here, Serve does not run, or the app is not deployed (or not over
    HTTP). ``host`` as in :func:`app_url_from_details`.
    """
    import ray

    if not ray.is_initialized():  # never start a cluster just to look something up
        return None
    try:  # a private accessor of Ray 2.60 (what `serve status` uses); pinned by the integration tests
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        details = client.get_serve_details()
    except Exception:  # noqa: BLE001 - a controller that went away: no URL rather than a crash
        return None
    return app_url_from_details(details, app_name, host, ray.util.get_node_ip_address())


def deployed_app_url(address: str, app_name: str, host: str | None = None,
                     headers: dict[str, str] | None = None) -> str | None:
    """The URL ``app_name`` answers at, asked of the dashboard at ``address`` (``http://HEAD:8265``).

    For clients outside the cluster (the pipeline runner), which have no Ray session; ``headers`` carry
    the cluster's auth token. None when the dashboard does not answer or the app is not there.
    """
    try:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        details = ServeSubmissionClient(address, headers=headers or None).get_serve_details()
    except Exception:  # noqa: BLE001 - an unreachable or older/newer dashboard: the caller falls back
        return None
    return app_url_from_details(details, app_name, host)
