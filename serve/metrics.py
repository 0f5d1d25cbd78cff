"""Prometheus metrics of the service: Ray Serve custom metrics, recorded in the replicas.

Every Ray node serves its metrics on its metrics export port (`ray start --metrics-export-port`, 8080 under KubeRay;
`ray.init(_metrics_export_port=...)` locally) with a `ray_` prefix, next to Ray's own `ray_serve_*` metrics, and
Serve adds the labels `deployment`, `replica` and `application`:

    ray_mtn_requests_total{route, language, status}       /v1/generate answers (Ingress), by route and status code
    ray_mtn_batch_requests_bucket / ray_mtn_batch_images_bucket     requests and images per @serve.batch call
    ray_mtn_queue_wait_seconds_bucket{route}   admission (the Ingress hands the request on) -> its batch starts
    ray_mtn_generate_seconds_bucket{route}     its batch starts -> the batch's images are ready

`route` is the service's route (`native` or a translator key, `none` before routing), not the HTTP path;
`language` the routed language (ISO 639-1; a hybrid prompt's main one; `none` when undetermined or unrouted).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    """Made in each Ingress replica (a Ray metric needs the replica's context for its Serve labels)."""

    def __init__(self):
        self.requests = Counter("mtn_requests", description="Answers of /v1/generate by route, routed language and "
                                "HTTP status code", tag_keys=("route", "language", "status"))

    def request(self, route: str, language: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "language": language, "status": str(status)})


class GeneratorMetrics:
    """Made in each Generator replica; one observation per batch (sizes) or per request in it (times)."""

    def __init__(self):
        self.batch_requests = Histogram("mtn_batch_requests", description="Requests per @serve.batch call",
                                        boundaries=COUNTS)
        self.batch_images = Histogram("mtn_batch_images", description="Images per @serve.batch call",
                                      boundaries=COUNTS)
        self.queue_wait = Histogram("mtn_queue_wait_seconds", description="From admission at the Ingress to the "
                                    "start of the request's batch", boundaries=SECONDS, tag_keys=("route",))
        self.generate = Histogram("mtn_generate_seconds", description="From the start of the request's batch to "
                                  "its images", boundaries=SECONDS, tag_keys=("route",))

    def batch(self, routes: list[str], waits_s: list[float], images: int, run_s: float) -> None:
        """One finished batch: the route and queue wait of each of its requests, its images, its run time."""
        self.batch_requests.observe(len(routes))
        self.batch_images.observe(images)
        for route, wait in zip(routes, waits_s, strict=True):
            self.queue_wait.observe(max(wait, 0.0), tags={"route": route})  # clocks of two nodes may differ a little
            self.generate.observe(run_s, tags={"route": route})
