"""Prometheus text-format metrics of one replica (requests, tokens, latency, queue, batch sizes).

Kept dependency-free and tiny: counters and histograms in dicts, rendered on ``GET /metrics``.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Thread-safe: the engine thread records batches while the event loop records requests."""

    PREFIX = "alpaca_ray_serve_"
    HELP = {
        "requests_total": ("counter", "HTTP requests by route and status code"),
        "prompt_tokens_total": ("counter", "prompt tokens processed"),
        "completion_tokens_total": ("counter", "tokens generated"),
        "flagged_total": ("counter", "requests refused by the content filter, by where it was flagged"),
        "reports_total": ("counter", "responses reported by users"),
        "request_latency_seconds": ("histogram", "time from request to last token"),
        "batch_size": ("histogram", "sequences decoded together per engine batch"),
        "queue_depth": ("gauge", "sequences waiting for the engine"),
        "running_sequences": ("gauge", "sequences being decoded"),
        "max_batch_size_observed": ("gauge", "largest batch decoded so far"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, float] = defaultdict(float)
        self.histograms = {"request_latency_seconds": Histogram(LATENCY_BUCKETS),
                           "batch_size": Histogram(BATCH_BUCKETS)}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)
            if name == "batch_size":
                self.gauges["max_batch_size_observed"] = max(self.gauges["max_batch_size_observed"], value)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in self.HELP.items():
                full = self.PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    series = self.counters.get(name) or {(): 0.0}
                    lines += [f"{full}{_labels(dict(k))} {v:g}" for k, v in sorted(series.items())]
                elif kind == "gauge":
                    lines.append(f"{full} {self.gauges.get(name, 0.0):g}")
                else:
                    histogram = self.histograms[name]
                    for bound, count in zip(histogram.buckets, histogram.counts):
                        lines.append(f'{full}_bucket{{le="{bound:g}"}} {count}')
                    lines += [f'{full}_bucket{{le="+Inf"}} {histogram.total}', f"{full}_sum {histogram.sum:g}",
                              f"{full}_count {histogram.total}"]
        return "\n".join(lines) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of a Prometheus text page (for tests and the benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
