"""Load for the dice API: mostly dice rolls, some health checks, a few intentional failures.

Compose runs it with the web UI on :8089 and starts a gentle load by itself (`--autostart`), so every
dashboard panel has data within a minute. The tests run it headless against a local app and compare
locust's own per-route counts with what each telemetry source reports, so every request is named by
its path and nothing else varies: one task, one route.
"""

from locust import HttpUser, between, task


class DiceUser(HttpUser):
    # About one request per user per second: gentle enough for a laptop, steady enough for rate()s.
    wait_time = between(0.5, 1.5)

    @task(10)
    def roll(self):
        self.client.get("/", name="/")

    @task(2)
    def health(self):
        self.client.get("/health", name="/health")

    @task(1)
    def fail(self):
        # /fail answers 500 on purpose, so a 500 counts as a success and anything else as a failure.
        # Locust's failure count then means "unexpected answer" on every route, and with no failures
        # its per-route counts are also per-status counts: 200 for / and /health, 500 for /fail.
        with self.client.get("/fail", name="/fail", catch_response=True) as response:
            if response.status_code == 500:
                response.success()
            else:
                response.failure(f"expected 500 from /fail, got {response.status_code}")
