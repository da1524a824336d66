"""Dice API: the application under observation. Its owners' code; observability is added from outside."""

import logging
import os
import random

from flask import Flask, jsonify
from prometheus_flask_exporter import PrometheusMetrics
from werkzeug.exceptions import HTTPException

APP_NAME = "dice-api"
APP_VERSION = os.environ.get("APP_VERSION", "dev")

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
)
logger = logging.getLogger(APP_NAME)

app = Flask(__name__)

metrics = PrometheusMetrics(app, default_labels={"app": APP_NAME})
metrics.info("app_info", "Dice API build information", version=APP_VERSION)


@app.route("/")
def roll_dice():
    value = random.randint(1, 6)
    logger.info("Dice rolled: %d", value)
    return jsonify(dice_value=value)


@app.route("/health")
def health():
    return jsonify(status="ok", app=APP_NAME, version=APP_VERSION)


@app.route("/fail")
def fail():
    raise RuntimeError("Intentional failure")


@app.errorhandler(Exception)
def handle_exception(error):
    # Client errors such as 404 and 405 keep their own status; only real failures become a 500.
    if isinstance(error, HTTPException):
        return error
    logger.exception("Unhandled error: %s", error)
    return jsonify(error="internal_server_error", app=APP_NAME, message=str(error)), 500


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "5000")))
