"""Load for the Wagtail site: each request is named by the route the app matches it to (the SERVER span's
http.route: Django's URL pattern, Wagtail's page router being one regular expression for every page), then a
space and what sets it apart from other requests to the same route, so that what locust sent compares with
every source per route.

A search for a lone double quote is an FTS5 syntax error in SQLite's full-text search, which the search view
does not catch: a real 500 with an exception (django.db.utils.OperationalError) behind it. A page that does not
exist is Wagtail's page router raising Http404: a 404.
"""

from locust import HttpUser, constant, task

PAGES = r"^((?:[\w\-]+/)*)$"  # wagtail.urls: every page of the site, served by Wagtail's page router


class WagtailUser(HttpUser):
    wait_time = constant(0.1)

    @task(5)
    def home(self):
        self.client.get("/", name=f"{PAGES} (home)")

    @task(2)
    def search(self):
        self.client.get("/search/?query=dice", name="search/")

    @task(1)
    def admin_login(self):
        self.client.get("/admin/login/", name="admin/login/")

    @task(1)
    def search_with_a_quote(self):
        self.client.get('/search/?query="', name="search/ (quote)")

    @task(1)
    def missing_page(self):
        self.client.get("/no-such-page/", name=f"{PAGES} (missing)")
