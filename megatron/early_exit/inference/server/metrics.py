"""Server counters in Prometheus' text exposition format (GET /metrics), no client library needed."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

WINDOW_S = 10.0  # tokens/s is measured over the last WINDOW_S seconds
ENDPOINTS = ("/api", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    """Thread-safe counters: the HTTP side records requests, the scheduler records finished jobs."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.exit_tokens: Counter[int] = Counter()  # tokens per exit layer (num_layers = final head)
        self.jobs = 0
        self.job_seconds = 0.0
        self.cancelled_jobs = 0
        self.recent: deque[tuple[float, int]] = deque()  # (finish time, tokens) for tokens/s
        self.load = lambda: (0, 0)  # set by the app: (queued requests, running sequences)

    def request(self, path: str, status: int) -> None:
        label = path if path in ENDPOINTS else "other"
        with self.lock:
            self.requests[(label, int(status))] += 1

    def cancelled(self) -> None:
        with self.lock:
            self.cancelled_jobs += 1

    def job_finished(self, job) -> None:
        now = time.perf_counter()
        generated = sum(len(r.tokens) for r in job.results)
        with self.lock:
            if job.counts_as_request:  # a request split into batches counts once, at its last part
                self.jobs += 1
                self.job_seconds += job.finished - job.submitted
            self.prompt_tokens += sum(len(p) for p in job.prompts)
            self.generated_tokens += generated
            for r in job.results:
                self.exit_tokens.update(r.exit_layers)
            self.recent.append((now, generated))

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self.lock:
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / WINDOW_S

    def render(self) -> str:
        """The exposition text: HELP/TYPE lines and one sample per line."""
        tps = self.tokens_per_second()
        queued, running = self.load()
        with self.lock:
            total = sum(self.exit_tokens.values())
            avg = sum(k * v for k, v in self.exit_tokens.items()) / total if total else 0.0
            early = sum(v for k, v in self.exit_tokens.items() if k < self.num_layers)
            lines = _family("ee_requests_total", "counter", "HTTP requests by endpoint and status code")
            for (path, code), n in sorted(self.requests.items()):
                lines.append(f'ee_requests_total{{endpoint="{path}",code="{code}"}} {n}')
            for name, kind, help_, value in (
                ("ee_generation_requests_total", "counter", "generation requests completed", self.jobs),
                ("ee_cancelled_requests_total", "counter", "requests whose client went away", self.cancelled_jobs),
                ("ee_prompt_tokens_total", "counter", "prompt tokens processed", self.prompt_tokens),
                ("ee_generated_tokens_total", "counter", "tokens generated", self.generated_tokens),
                ("ee_request_seconds_sum", "counter", "time from submission to completion, summed", self.job_seconds),
                ("ee_tokens_per_second", "gauge", f"generated tokens/s over the last {WINDOW_S:g} s", tps),
                ("ee_average_exit_layer", "gauge", "average layer at which generated tokens exited", avg),
                (
                    "ee_early_exit_share",
                    "gauge",
                    "share of tokens that left before the final head",
                    early / max(total, 1),
                ),
                ("ee_queued_requests", "gauge", "requests waiting for a slot", queued),
                ("ee_running_sequences", "gauge", "sequences decoding now", running),
            ):
                lines += _family(name, kind, help_)
                lines.append(f"{name} {value}")
            lines += _family("ee_exit_tokens_total", "counter", "generated tokens by exit layer")
            for layer, n in sorted(self.exit_tokens.items()):
                lines.append(f'ee_exit_tokens_total{{layer="{layer}"}} {n}')
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
