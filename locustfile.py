"""Load for the dice API, as named scenarios. `DICE_SCENARIO` picks one (default `steady`):

| scenario | users | what it does | headless, it ends |
|---|---|---|---|
| steady | `-u` (compose: 5) | ~1 req/s per user: 10 rolls : 2 health : 1 failure | after `-t` or DICE_SECONDS (60) |
| spike  | a shape | 5 users, ramp to DICE_SPIKE_USERS (40) with no wait, back to 5 | after DICE_SECONDS (90) |
| errors | `-u` | the steady pace, but half of all requests go to /fail | after `-t` or DICE_SECONDS (60) |
| scan   | `-u` | random unknown paths, as a scanner sends them, all named "/**" | after DICE_SCAN_REQUESTS (2000) |

Compose runs `steady` with the web UI (`--autostart`), so every dashboard has data within a minute. The
tests and `make compare` run a scenario headless and compare locust's own per-route counts with what each
telemetry source reports, so every request is named by its route (the label the recording rules use,
"/**" for unmatched paths) and each route answers with one status: 200 for / and /health, 500 for /fail,
404 for the scan. An unexpected status is a locust failure.
"""

from __future__ import annotations

import itertools
import os
import secrets

import gevent

from locust import HttpUser, LoadTestShape, between, constant, events, task

SCENARIOS = ("steady", "spike", "errors", "scan")
SCENARIO = os.environ.get("DICE_SCENARIO", "steady")
if SCENARIO not in SCENARIOS:
    raise SystemExit(f"DICE_SCENARIO={SCENARIO!r} is not a scenario; choose one of {', '.join(SCENARIOS)}")
SECONDS = int(os.environ.get("DICE_SECONDS") or (90 if SCENARIO == "spike" else 60))
# The spike's peak of users; half of it on the way up and down.
SPIKE_USERS = int(os.environ.get("DICE_SPIKE_USERS", "40"))
SCAN_REQUESTS = int(os.environ.get("DICE_SCAN_REQUESTS", "2000"))


def expect(client, path: str, status: int, name: str | None = None) -> None:
    # catch_response: /fail's 500 and the scan's 404 are what they should be, so they count as
    # successes, and locust's failure count means "unexpected answer" on every route.
    with client.get(path, name=name or path, catch_response=True) as response:
        if response.status_code == status:
            response.success()
        else:
            response.failure(f"expected {status} from {name or path}, got {response.status_code}")


class _Dice(HttpUser):
    abstract = True
    # About one request per user per second: gentle enough for a laptop, steady enough for rate()s.
    wait_time = between(0.5, 1.5)

    def roll(self):
        expect(self.client, "/", 200)

    def health(self):
        expect(self.client, "/health", 200)

    def fail(self):
        expect(self.client, "/fail", 500)


if SCENARIO == "steady":

    class DiceUser(_Dice):
        tasks = {_Dice.roll: 10, _Dice.health: 2, _Dice.fail: 1}

elif SCENARIO == "errors":

    class ErrorsUser(_Dice):
        tasks = {_Dice.roll: 4, _Dice.health: 1, _Dice.fail: 5}

elif SCENARIO == "spike":

    class SpikeUser(_Dice):
        # No think time: each user sends as fast as the app answers, so users are concurrency.
        wait_time = constant(0)
        tasks = {_Dice.roll: 10, _Dice.health: 2, _Dice.fail: 1}

    class SpikeShape(LoadTestShape):
        """Baseline, ramp past saturation (gunicorn has 2 sync workers: 2 requests at a time), hold,
        back to baseline. Fractions of DICE_SECONDS, so a short run keeps the same shape."""

        stages = ((0.2, 5), (0.4, SPIKE_USERS // 2), (0.7, SPIKE_USERS), (0.85, SPIKE_USERS // 2), (1.0, 5))

        def tick(self):
            elapsed = self.get_run_time() / SECONDS
            for end, users in self.stages:
                if elapsed < end:
                    return users, users
            return None

elif SCENARIO == "scan":
    _sent = itertools.count(1)
    _shapes = ("/{}", "/admin/{}.php", "/{}/../etc/passwd", "/api/v1/users/{}", "/{}.env", "/wp-{}/x")

    class ScanUser(HttpUser):
        wait_time = constant(0)

        @task
        def scan(self):
            number = next(_sent)
            if number > SCAN_REQUESTS:
                if number == SCAN_REQUESTS + 1:
                    # From a greenlet of its own: quit() stops every user, and called in this user it
                    # would kill itself halfway, leaving the run idle until DICE_SECONDS ended it.
                    gevent.spawn(self.environment.runner.quit)
                return
            path = _shapes[number % len(_shapes)].format(secrets.token_hex(6))
            expect(self.client, path, 404, name="/**")


@events.test_start.add_listener
def _bound_headless_runs(environment, **_kwargs):
    # Headless runs always end: a run time given with -t wins, otherwise DICE_SECONDS.
    options = environment.parsed_options
    if options is not None and options.headless and not options.run_time and environment.shape_class is None:
        gevent.spawn_later(SECONDS, environment.runner.quit)
