"""The server's Prometheus metrics, in a registry of their own (prometheus_client; one server per process,
but a private registry keeps tests that build several apps in one process apart)."""

from __future__ import annotations

# generation is milliseconds on small models and seconds on 7B ones on a CPU: the buckets span both
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STEP_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self, visual_tokens: int, visual_tokens_kept: list[int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("mllm_requests", "HTTP requests answered, by path and status code (499: the client"
                                " went away first)", ["path", "status"], registry=r)
        self.generations = Counter("mllm_generations", "generations ended, by outcome: stop (end of answer or a stop"
                                   " string), length (max_tokens), cancelled (client gone or shutdown), error",
                                   ["outcome"], registry=r)
        self.queue_depth = Gauge("mllm_queue_depth", "requests admitted and waiting for the model", registry=r)
        self.running = Gauge("mllm_requests_running", "requests the model is generating for (0 or 1)", registry=r)
        self.queue_wait = Histogram("mllm_queue_wait_seconds", "time from admission to the start of generation",
                                    buckets=_SECONDS, registry=r)
        self.prefill = Histogram("mllm_prefill_seconds", "vision encoder + prefill + the first token, per request",
                                 buckets=_SECONDS, registry=r)
        self.decode = Histogram("mllm_decode_seconds", "one decode step (each generated token after the first)",
                                buckets=_STEP_SECONDS, registry=r)
        self.generation_seconds = Histogram("mllm_generation_seconds", "generation from its start to its end",
                                            buckets=_SECONDS, registry=r)
        self.prompt_tokens = Counter("mllm_prompt_tokens", "prompt tokens prefilled (text + visual)", registry=r)
        self.generated_tokens = Counter("mllm_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Gauge("mllm_decode_tokens_per_second",
                                       "decode throughput of the last generation of more than one token", registry=r)
        self.rejected = Counter("mllm_rejected", "requests refused with 429 because the queue was full", registry=r)
        visual = Gauge("mllm_visual_tokens", "visual tokens the vision encoder gives the language model per image",
                       registry=r)
        visual.set(visual_tokens)
        kept = Gauge("mllm_visual_tokens_kept", "visual tokens each decoder layer keeps under the bundle's recipe",
                     ["layer"], registry=r)
        for layer, n in enumerate(visual_tokens_kept):
            kept.labels(layer=str(layer)).set(n)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCounter:
    """ASGI middleware: counts every answered request by path and status (the status of the response start; 500
    for an exception that escaped the app)."""

    KNOWN = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = next((k for k in self.KNOWN if path == k or path.startswith(k + "/")), "other")
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(path=label, status=str(status[0])).inc()
