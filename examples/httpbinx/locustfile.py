"""Load for httpbinx: each request is named by the route the app matches it to (the SERVER span's http.route),
"(no route)" when none matches, so that what locust sent compares with every source per route.

/range/{numbytes} raises NotImplementedError in the app: a real 500 with an exception behind it.
/status/503 is a 503 the endpoint returns on purpose: a 5xx with no exception.
"""

from locust import HttpUser, constant, task


class HttpbinxUser(HttpUser):
    wait_time = constant(0.1)

    @task(5)
    def get(self):
        self.client.get("/get", name="/get")

    @task(2)
    def uuid(self):
        self.client.get("/uuid", name="/uuid")

    @task(1)
    def status(self):
        self.client.get("/status/503", name="/status/{codes}")

    @task(1)
    def range_not_implemented(self):
        self.client.get("/range/10", name="/range/{numbytes}")

    @task(1)
    def unknown(self):
        self.client.get("/no-such-page", name="(no route)")
