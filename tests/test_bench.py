"""The cost benchmark's code, run for real but briefly: `make test` does not run the benchmark itself.

The real run is `make bench` (about 10 minutes). This smoke test drives the same code with vegeta as the
closed-loop generator (built from its Go module, so it needs nothing from apt), one round of a few seconds,
and checks the outputs' shape. It asserts no performance figure: timings belong to the benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tooling.bench import breakdown, parse_variant

pytestmark = pytest.mark.integration


def test_a_short_run_measures_every_mode_and_writes_its_outputs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tooling.bench", "--rounds", "1", "--seconds", "2", "--closed-loop", "vegeta",
         "--modes", "plain,otel,lean,quiet", "--variant", "quiet:OTEL_TRACES_SAMPLER=always_off",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["modes"] == ["plain", "otel", "lean", "quiet"]
    assert [s["mode"] for s in report["samples"]] == ["plain", "otel", "lean", "quiet"]
    for sample in report["samples"]:
        assert sample["requests"] > 0 and sample["errors"] == 0, sample
        assert sample["cpu_ms_per_request"] > 0 and sample["worker_rss_mib"] > 0, sample
    assert report["summary"]["plain"]["cpu_ratio"] == 1.0
    assert report["lean_profile"]["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
    assert "CPU per request, x plain" in (tmp_path / "bench.txt").read_text()


@pytest.mark.unit
def test_a_variant_is_name_and_settings_and_a_typo_is_refused():
    import argparse

    assert parse_variant("s10:A=1,B=x") == ("s10", {"A": "1", "B": "x"})
    for bad in ("nosettings", "n:", ":A=1", "n:A"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


@pytest.mark.unit
def test_the_breakdown_puts_each_sample_in_the_leaf_most_category():
    class Upload:
        def __init__(self, stacks):
            self._stacks = stacks

        def stacks(self):
            return self._stacks

    app = "roll_dice (/x/app.py)"
    otel = "Tracer.start_span (/x/site-packages/opentelemetry/sdk/trace/__init__.py)"
    flask = "Flask.wsgi_app (/x/site-packages/flask/app.py)"
    result = breakdown([Upload([([flask, app], 3), ([flask, otel], 1)])])
    assert result["by_category_pct"] == {"the app and Flask": 75.0,
                                         "span processing (BatchSpanProcessor, Pyroscope span processor)": 25.0}
    assert dict(result["top_inclusive_pct"])[flask] == 100.0
