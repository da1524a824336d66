"""Load for httpbin: each request is named by the route the app matches it to (the SERVER span's http.route),
"(no route)" when none matches, so that what locust sent compares with every source per route.

/drip with a number that is not one raises ValueError inside the view: a real 500 with an exception behind it.
/status/503 is a 503 the view returns on purpose: a 5xx with no exception.
"""

from locust import HttpUser, constant, task


class HttpbinUser(HttpUser):
    wait_time = constant(0.1)

    @task(5)
    def get(self):
        self.client.get("/get", name="/get")

    @task(2)
    def anything(self):
        self.client.get("/anything/dice", name="/anything/<path:anything>")

    @task(1)
    def status(self):
        self.client.get("/status/503", name="/status/<codes>")

    @task(1)
    def drip_with_a_bad_number(self):
        self.client.get("/drip?numbytes=abc", name="/drip")

    @task(1)
    def unknown(self):
        self.client.get("/no-such-page", name="(no route)")
