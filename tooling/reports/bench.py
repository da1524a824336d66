"""What observing costs: the app's CPU, throughput, latency and memory per mode, measured side by side.

    python -m tooling.reports.bench                      # plain, otel, full, lean: about 9 minutes
    python -m tooling.reports.bench --in-process         # every lever, in-process: about 3 minutes
    python -m tooling.reports.bench --rounds 1 --seconds 5 --modes plain,otel

The modes (MODES) all run on the same gunicorn settings (app/app.env): `plain`, the owners' command alone;
`otel`, under opentelemetry-instrument; `full`, every signal (traces of every request, the SDK's metrics,
every log record, Pyroscope with span profiles: app/profile-full.env); one mode per *lever*, the full set
with one thing changed, so that full's CPU per request minus the lever's is what that one thing costs; and
`lean` (app/profile-lean.env).

The modes run interleaved, round after round, because these machines are noisy: a slow minute hits every
mode alike, and a lever's saving is taken within a round (full's round minus the lever's) before the
median over rounds. Per mode and round: the app's CPU per request (gunicorn's master and workers, from
/proc), saturation throughput (closed loop), spans the collector accepted per request (the sampler at
work), p50 and p99 latency at one fixed open-loop rate that every mode can serve (half the full set's
saturation, measured first), RSS per worker, and the pipeline's own cost (collector and Prometheus CPU
per 1,000 requests, and their RSS). The closed loop is wrk (Debian's package) or vegeta, the open loop
vegeta, built from its Go module into .cache/. Reports medians and spreads (min-max) and ratios to plain,
as a table, bench.json and bench.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tooling.builds import binary
from tooling.config import load_env_file
from tooling.native.stack import APP_DIR, REPO_ROOT, AppSettings, NativeStack, start_app

FULL_PROFILE = APP_DIR / "profile-full.env"
LEAN_PROFILE = APP_DIR / "profile-lean.env"


@dataclass(frozen=True)
class Mode:
    name: str
    what: str
    settings: dict[str, str] = field(default_factory=dict)  # on top of app/app.env and the full profile
    instrumented: bool = True
    profiled: bool = True
    # A lever: the full set with one thing changed; what that thing costs is full's CPU minus this mode's.
    lever: bool = False
    otlp_protocol: str = "grpc"


MODES: tuple[Mode, ...] = (
    Mode("plain", "the owners' gunicorn alone: the app and its own metrics", instrumented=False, profiled=False),
    Mode("otel", "opentelemetry-instrument: every trace, the SDK's metrics and logs over OTLP/gRPC", profiled=False),
    Mode("full", "otel + Pyroscope at 100 Hz with span profiles: every signal (app/profile-full.env)"),
    Mode("no-recording", "spans started but not recorded or exported (sampler always_off)",
         {"OTEL_TRACES_SAMPLER": "always_off"}, lever=True),
    Mode("no-sdk-metrics", "SDK metrics not exported: a MeterProvider without readers (still recorded)",
         {"OTEL_METRICS_EXPORTER": "none"}, lever=True),
    Mode("no-exemplars", "the SDK's histogram without exemplars",
         {"OTEL_METRICS_EXEMPLAR_FILTER": "always_off"}, lever=True),
    Mode("no-log-handler", "no OTLP logging handler (one INFO record per / not exported)",
         {"OTEL_PYTHON_LOG_AUTO_INSTRUMENTATION": "false", "OTEL_LOGS_EXPORTER": "none"}, lever=True),
    Mode("warning-logs", "the OTLP logging handler at WARNING: records below it are not exported",
         {"OTEL_PYTHON_LOG_HANDLER_LEVEL": "warning"}, lever=True),
    Mode("pyroscope-10hz", "Pyroscope sampling at 10 Hz instead of 100",
         {"PYROSCOPE_SAMPLE_RATE": "10"}, lever=True),
    Mode("no-span-profiles", "Pyroscope without its span processor (no trace-to-profile link)",
         {"PYROSCOPE_SPAN_PROFILES": "false"}, lever=True),
    Mode("otlp-http", "OTLP over HTTP/protobuf instead of gRPC", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
         lever=True, otlp_protocol="http"),
    Mode("wsgi-only", "OTel's WSGI middleware instead of the Flask instrumentation (spans without http.route)",
         {"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask", "ZEROCODE_HTTP_INSTRUMENTATION": "wsgi"}, lever=True),
    Mode("tracecontext-only", "the W3C trace-context propagator alone, no baggage",
         {"OTEL_PROPAGATORS": "tracecontext"}, lever=True),
    Mode("lean", "the lean profile (app/profile-lean.env) on top of full"),
)
MODE_NAMES = tuple(m.name for m in MODES)
# What the closed and open loops measure by default: the levers' differences of tens of microseconds are
# below what a load generator sharing two cores lets them resolve, so they are the in-process table's.
HEADLINE = ("plain", "otel", "full", "lean")


class BenchError(RuntimeError):
    pass


def vegeta_binary() -> Path:
    """vegeta at VEGETA_VERSION, the builds row `vegeta`, built once into .cache/vegeta/ (about 20 s cold)."""
    return binary("vegeta", log=lambda line: print(line, flush=True))


def attack(url: str, seconds: float, rate: int | None, connections: int, tool: str = "vegeta") -> dict:
    """One load run on GET url. rate=None is a closed loop (`connections` clients, each sending its next
    request when the last is answered): wrk by default, which costs the machine the least CPU; vegeta
    where wrk is missing (the smoke test). Otherwise an open loop at `rate` requests/s, with vegeta."""
    if rate is None and tool == "wrk":
        return wrk(url, seconds, connections)
    vegeta = str(vegeta_binary())
    pacing = ["-rate", "0", "-max-workers", str(connections), "-workers", str(connections)] if rate is None \
        else ["-rate", f"{rate}/s", "-workers", str(connections)]
    run = subprocess.run([vegeta, "attack", "-duration", f"{seconds}s", "-timeout", "10s", "-keepalive=false",
                          *pacing], input=f"GET {url}\n".encode(), capture_output=True, timeout=seconds + 60)
    if run.returncode != 0:
        raise BenchError(f"vegeta attack failed: {run.stderr.decode(errors='replace')[-2000:]}")
    report = subprocess.run([vegeta, "report", "-type", "json"], input=run.stdout, capture_output=True,
                            timeout=120)
    data = json.loads(report.stdout)
    return {"requests": data["requests"], "throughput": data["throughput"], "success": data["success"],
            "p50_ms": data["latencies"]["50th"] / 1e6, "p99_ms": data["latencies"]["99th"] / 1e6,
            "non_200": sum(n for code, n in data.get("status_codes", {}).items() if code != "200")}


def wrk(url: str, seconds: float, connections: int) -> dict:
    import re
    import shutil

    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed; it is the closed-loop load generator (Debian/Ubuntu: "
                         "`sudo apt-get install wrk`), or run with --closed-loop vegeta")
    run = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{int(seconds)}s", url],
                         capture_output=True, text=True, timeout=seconds + 60)
    if run.returncode != 0:
        raise BenchError(f"wrk failed: {run.stderr[-2000:]}")
    requests_done = int(re.search(r"(\d+) requests in", run.stdout).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", run.stdout)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", run.stdout)
    return {"requests": requests_done, "throughput": float(re.search(r"Requests/sec:\s+([\d.]+)", run.stdout).group(1)),
            "non_200": (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)}


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# Extra modes from --variant NAME:KEY=VALUE,...: the full set with those settings on top, as a lever.
VARIANTS: dict[str, Mode] = {}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split(",") if item]
    if not sep or not name or not pairs or any(not key or not eq for key, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, {key: value for key, _, value in pairs}


def find_mode(name: str) -> Mode:
    found = VARIANTS.get(name) or next((m for m in MODES if m.name == name), None)
    if found is None:
        raise BenchError(f"--modes: unknown {name!r}; choose from {', '.join(MODE_NAMES)} or a --variant")
    return found


def mode_settings(mode: Mode, stack: NativeStack) -> AppSettings:
    # Every instrumented mode starts from the full profile, whatever APP_PROFILE says where this runs.
    overrides = load_env_file(FULL_PROFILE) if mode.instrumented else {}
    overrides.update(load_env_file(LEAN_PROFILE) if mode.name == "lean" else mode.settings)
    port = stack.ports.otlp_http if mode.otlp_protocol == "http" else stack.ports.otlp_grpc
    return AppSettings(otlp_endpoint=f"http://127.0.0.1:{port}",
                       pyroscope_address=stack.pyroscope_sink.address if mode.profiled else None,
                       overrides=overrides, instrumented=mode.instrumented)


def accepted_spans(stack: NativeStack) -> float:
    """The collector's count of spans accepted by its receivers so far (its own telemetry, in Prometheus's
    text format: one line per receiver and transport, `name{labels} value`)."""
    import re
    import urllib.request

    url = f"http://127.0.0.1:{stack.ports.collector_telemetry}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(value) for value in re.findall(
        r"^otelcol_receiver_accepted_spans(?:_total)?(?:\{[^}]*\})?\s+(\S+)", text, re.MULTILINE))


@dataclass
class Sample:
    mode: str
    round: int
    requests: int
    throughput: float
    cpu_ms_per_request: float
    spans_per_request: float
    open_rate: int
    p50_ms: float
    p99_ms: float
    worker_rss_mib: float
    collector_cpu_ms_per_1k: float
    prometheus_cpu_ms_per_1k: float
    collector_rss_mib: float
    prometheus_rss_mib: float
    errors: int


SPAN_BATCH_DELAY_S = 5.5  # the SDK's OTEL_BSP_SCHEDULE_DELAY (5 s), and a margin


def workers_started(master, mode: str) -> None:
    deadline = time.monotonic() + 20
    while len(master.children()) < int(load_env_file(APP_DIR / "app.env")["GUNICORN_WORKERS"]):
        if time.monotonic() > deadline:
            raise BenchError(f"{mode}: gunicorn's workers did not start")
        time.sleep(0.2)


def measure(mode: Mode, round_: int, stack: NativeStack, args, open_rate: int | None, run_dir: Path) -> Sample:
    """One mode, one round: a closed loop (CPU per request, saturation, spans) and, with `open_rate`, an
    open loop at that rate (latency); without it (the calibration), no open loop."""
    import psutil

    settings = mode_settings(mode, stack)
    app = start_app(settings, run_dir / f"{mode.name}-{round_}")
    try:
        master = psutil.Process(app.process.pid)
        workers_started(master, mode.name)
        url = f"{settings.url}/"
        attack(url, args.warmup, None, args.connections, args.closed_loop)  # imports, first exports, caches
        # The SDK exports spans every 5 s or at 512 spans (its batch defaults): wait for the warm-up's last
        # batch, so that neither its spans nor their export fall into the measurement.
        time.sleep(SPAN_BATCH_DELAY_S)
        pids = [master.pid] + [c.pid for c in master.children()]
        pipeline = [stack.collector.process.pid, stack.prometheus.process.pid]
        spans = accepted_spans(stack)
        app_cpu, collector_cpu, prometheus_cpu = cpu_seconds(pids), cpu_seconds(pipeline[:1]), cpu_seconds(pipeline[1:])
        closed = attack(url, args.seconds, None, args.connections, args.closed_loop)
        app_cpu = cpu_seconds(pids) - app_cpu
        collector_cpu = cpu_seconds(pipeline[:1]) - collector_cpu
        prometheus_cpu = cpu_seconds(pipeline[1:]) - prometheus_cpu
        # The closed loop's last batch (fewer than 512 spans): counted, though its export, about a
        # microsecond per request of the window, falls after the CPU reading.
        time.sleep(SPAN_BATCH_DELAY_S)
        spans = accepted_spans(stack) - spans
        opened = attack(url, args.seconds, open_rate, args.connections * 4) if open_rate else \
            {"p50_ms": float("nan"), "p99_ms": float("nan"), "non_200": 0}
        workers = [c.pid for c in master.children()]
        per_1k = 1000 / max(1, closed["requests"])
        return Sample(
            mode=mode.name, round=round_, requests=closed["requests"], throughput=closed["throughput"],
            cpu_ms_per_request=1000 * app_cpu / max(1, closed["requests"]),
            spans_per_request=spans / max(1, closed["requests"]), open_rate=open_rate or 0,
            p50_ms=opened["p50_ms"], p99_ms=opened["p99_ms"],
            worker_rss_mib=statistics.mean(rss_mib(p) for p in workers),
            collector_cpu_ms_per_1k=1000 * collector_cpu * per_1k,
            prometheus_cpu_ms_per_1k=1000 * prometheus_cpu * per_1k,
            collector_rss_mib=rss_mib(pipeline[0]), prometheus_rss_mib=rss_mib(pipeline[1]),
            errors=closed["non_200"] + opened["non_200"])
    finally:
        app.stop()


FIGURES = (("cpu_ms_per_request", "app CPU per request (ms)", "{:.3f}"), ("throughput", "saturation (req/s)", "{:.0f}"),
           ("spans_per_request", "spans per request", "{:.2f}"),
           ("p50_ms", "p50 at open rate (ms)", "{:.1f}"), ("p99_ms", "p99 at open rate (ms)", "{:.1f}"),
           ("worker_rss_mib", "RSS per worker (MiB)", "{:.0f}"),
           ("collector_cpu_ms_per_1k", "collector CPU per 1k req (ms)", "{:.0f}"),
           ("prometheus_cpu_ms_per_1k", "Prometheus CPU per 1k req (ms)", "{:.0f}"),
           ("collector_rss_mib", "collector RSS (MiB)", "{:.0f}"),
           ("prometheus_rss_mib", "Prometheus RSS (MiB)", "{:.0f}"))


def summarise(samples: list[Sample], modes: list[Mode]) -> dict:
    summary = {}
    for mode in modes:
        rows = [s for s in samples if s.mode == mode.name]
        summary[mode.name] = {key: spread([getattr(s, key) for s in rows]) for key, _, _ in FIGURES}
        summary[mode.name]["errors"] = sum(s.errors for s in rows)
    if "plain" in summary:
        base = summary["plain"]
        for mode in modes:
            for key, ratio in (("cpu_ms_per_request", "cpu_ratio"), ("throughput", "throughput_ratio")):
                summary[mode.name][ratio] = summary[mode.name][key]["median"] / base[key]["median"]
            # Per request, in microseconds, over plain: what observing adds in this mode.
            summary[mode.name]["added_us"] = 1000 * (summary[mode.name]["cpu_ms_per_request"]["median"]
                                                     - base["cpu_ms_per_request"]["median"])
    if "full" in summary:
        for mode in modes:
            if mode.lever or mode.name in ("otel", "lean"):
                summary[mode.name]["saving_us"] = lever_saving(samples, mode.name)
    return summary


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def lever_saving(samples: list[Sample], name: str) -> dict:
    """What a mode saves against the full set, in microseconds of app CPU per request: full's CPU per request
    minus the mode's, taken round by round (each pair ran minutes apart at most), then the median and the
    spread over rounds."""
    full = {s.round: s.cpu_ms_per_request for s in samples if s.mode == "full"}
    return spread([1000 * (full[s.round] - s.cpu_ms_per_request)
                   for s in samples if s.mode == name and s.round in full])


def format_table(report: dict) -> str:
    names = report["modes"]
    summary = report["summary"]
    lines = [f"{report['date']}; {report['machine']}; {report['rounds']} interleaved rounds of {report['seconds']} s, "
             f"{report['connections']} connections; open-loop rate {report['open_rate']} req/s",
             "medians, [min-max] over rounds; 'saves' = full's CPU per request minus the mode's, per round", ""]
    head = (f"{'mode':20}{'CPU/req ms':>22}{'x plain':>9}{'saves us':>18}{'req/s':>8}{'spans/req':>10}"
            f"{'p50/p99 ms':>16}{'RSS/worker':>11}{'coll. ms/1k':>12}{'errors':>7}")
    lines.append(head)
    for name in names:
        row = summary[name]
        cpu = row["cpu_ms_per_request"]
        saving = row.get("saving_us")
        cells = [f"{name:20}", f"{cpu['median']:.3f} [{cpu['min']:.3f}-{cpu['max']:.3f}]".rjust(22),
                 f"{row['cpu_ratio']:.2f}".rjust(9) if "cpu_ratio" in row else " " * 9,
                 (f"{saving['median']:.0f} [{saving['min']:.0f}-{saving['max']:.0f}]" if saving else "").rjust(18),
                 f"{row['throughput']['median']:.0f}".rjust(8), f"{row['spans_per_request']['median']:.2f}".rjust(10),
                 f"{row['p50_ms']['median']:.1f} / {row['p99_ms']['median']:.1f}".rjust(16),
                 f"{row['worker_rss_mib']['median']:.0f} MiB".rjust(11),
                 f"{row['collector_cpu_ms_per_1k']['median']:.0f}".rjust(12), f"{row['errors']}".rjust(7)]
        lines.append("".join(cells))
    lines.append("")
    lines += [f"{name:20}{report['what'][name]}" for name in names]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["modes"]
    summary = report["summary"]
    fig, (cost, latency) = plt.subplots(1, 2, figsize=(16, 0.42 * len(names) + 2.2),
                                        gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(names)))[::-1]
    med = [summary[n]["cpu_ms_per_request"]["median"] for n in names]
    low = [m - summary[n]["cpu_ms_per_request"]["min"] for m, n in zip(med, names, strict=True)]
    high = [summary[n]["cpu_ms_per_request"]["max"] - m for m, n in zip(med, names, strict=True)]
    palette = {"plain": "tab:gray", "full": "tab:red", "lean": "tab:green"}
    colors = [palette.get(n, "tab:blue") for n in names]
    cost.barh(y, med, xerr=[low, high], color=colors, capsize=3)
    cost.set_yticks(y, names, fontsize=9)
    if "plain" in summary:
        base = summary["plain"]["cpu_ms_per_request"]["median"]
        for goal, label in ((1.2, "lean goal x1.2"), (1.6, "full goal x1.6")):
            cost.axvline(goal * base, color="black", linestyle=":", linewidth=1)
            cost.annotate(label, (goal * base, max(y) + 0.45), fontsize=8, ha="center")
        for yy, n, value in zip(y, names, med, strict=True):
            cost.annotate(f"x{value / base:.2f}", (summary[n]["cpu_ms_per_request"]["max"], yy), xytext=(4, -3),
                          textcoords="offset points", fontsize=8)
    cost.set_xlabel("app CPU per request (ms), median and min-max over rounds")
    p50 = [summary[n]["p50_ms"]["median"] for n in names]
    p99 = [summary[n]["p99_ms"]["median"] for n in names]
    latency.barh([v + 0.2 for v in y], p99, height=0.4, color="tab:orange", label="p99")
    latency.barh([v - 0.2 for v in y], p50, height=0.4, color="tab:purple", label="p50")
    latency.set_yticks(y, names, fontsize=9)
    latency.set_xscale("log")
    latency.set_xlabel(f"latency at {report['open_rate']} req/s open loop (ms, log)")
    latency.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"What observing costs, per mode and per lever: medians over {report['rounds']} interleaved rounds "
                 f"- {report['date']}, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Where a sample's CPU goes, by the first matching frame from the leaf up (files, as pprof names them).
CATEGORIES = (
    ("OTLP export (background threads)", ("opentelemetry/exporter", "grpc/", "google/protobuf")),
    ("span processing (BatchSpanProcessor, Pyroscope span processor)", ("opentelemetry/sdk/trace",
                                                                       "pyroscope/otel")),
    ("metrics recording (SDK histograms, exemplars)", ("opentelemetry/sdk/metrics",)),
    ("Flask/WSGI instrumentation", ("opentelemetry/instrumentation", "opentelemetry/util",
                                    "opentelemetry/semconv", "opentelemetry/trace", "opentelemetry/context",
                                    "opentelemetry/propagat", "opentelemetry/baggage", "opentelemetry/attributes")),
    ("the app's own metrics (prometheus-flask-exporter)", ("prometheus_flask_exporter", "prometheus_client")),
    ("the app and Flask", ("app.py", "flask/", "werkzeug/", "jinja2", "click/")),
    ("gunicorn (accept, parse, respond)", ("gunicorn/",)),
)


def breakdown(uploads) -> dict:
    """The CPU samples of the app's workers, by category (leaf-most matching frame) and by function
    (inclusive: a function counts for every sample it is on the stack of)."""
    from collections import Counter

    categories: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for upload in uploads:
        for frames, value in upload.stacks():
            total += value
            for frame in set(frames):
                inclusive[frame] += value
            for frame in reversed(frames):
                name = next((label for label, marks in CATEGORIES if any(m in frame for m in marks)), None)
                if name:
                    categories[name] += value
                    break
            else:
                categories["other (interpreter, stdlib)"] += value
    share = {k: round(100 * v / total, 1) for k, v in categories.most_common()} if total else {}
    top = [(frame, round(100 * v / total, 1)) for frame, v in inclusive.most_common(40)] if total else []
    return {"samples_ns": total, "by_category_pct": share, "top_inclusive_pct": top}


def profile_mode(name: str, args, out: Path) -> dict:
    """Profile one mode under closed-loop load with the Pyroscope hook's own flame graph data."""
    mode = find_mode(name)
    stack = NativeStack(out / "profile-stack", keep_traces=False).up(with_app=False)
    try:
        settings = mode_settings(mode, stack)
        settings.pyroscope_address = stack.pyroscope_sink.address
        settings.overrides = {**settings.overrides, "PYROSCOPE_UPLOAD_INTERVAL": "2"}
        app = start_app(settings, out / f"profile-{mode.name}")
        try:
            attack(f"{settings.url}/", 3, None, args.connections, args.closed_loop)
            started = len(stack.pyroscope_sink.snapshot())
            attack(f"{settings.url}/", args.seconds, None, args.connections, args.closed_loop)
            time.sleep(3)
            uploads = stack.pyroscope_sink.snapshot()[started:]
        finally:
            app.stop()
    finally:
        stack.down()
    return breakdown([u for u in uploads if u.labels.get("service_name")])


DRIVER = Path(__file__).with_name("drive_wsgi.py")


def drive(mode: Mode, stack: NativeStack, requests: int, warmup: int, run_dir: Path) -> float:
    """Microseconds of CPU per GET / of one mode, driven in-process (tooling/reports/drive_wsgi.py)."""
    import tempfile

    from tooling.native.stack import VENV_BIN, app_environment

    settings = mode_settings(mode, stack)
    env = app_environment(settings, Path(tempfile.mkdtemp(prefix="drive-multiproc-", dir=run_dir)))
    launcher = [str(VENV_BIN / "opentelemetry-instrument")] if mode.instrumented else []
    command = [*launcher, str(VENV_BIN / "python"), str(DRIVER), str(requests), str(warmup)]
    run = subprocess.run(command, cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=600)
    line = next((line for line in run.stdout.splitlines() if line.startswith("DRIVE ")), None)
    if run.returncode != 0 or line is None:
        raise BenchError(f"{mode.name}: the in-process driver failed: {run.stderr[-2000:]}")
    return json.loads(line.removeprefix("DRIVE "))["cpu_us_per_request"]


def in_process(args) -> dict:
    """Every mode's CPU per request with the WSGI callable driven in-process, round after round: the
    lever table, without the noise of sockets and a load generator on the same two cores."""
    from tooling.reports.compare import machine

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = [find_mode(m.strip()) for m in args.modes.split(",")]
    stack = NativeStack(out / "stack-in-process", keep_traces=False).up(with_app=False)
    cpu: dict[str, list[float]] = {m.name: [] for m in modes}
    try:
        for round_ in range(1, args.rounds + 1):
            for mode in modes[round_ - 1:] + modes[:round_ - 1]:
                cpu[mode.name].append(drive(mode, stack, args.requests, args.requests // 5, out))
                print(f"round {round_} {mode.name:20} {cpu[mode.name][-1]:7.1f} us CPU/request", flush=True)
    finally:
        stack.down()
    base = statistics.median(cpu["plain"]) if "plain" in cpu else None
    rows = {}
    for mode in modes:
        row = {"cpu_us": spread(cpu[mode.name]), "what": mode.what, "settings": mode_settings(mode, stack).overrides}
        if base:
            row["x_plain"] = row["cpu_us"]["median"] / base
        if "full" in cpu and mode.name != "full":
            row["saves_us"] = spread([f - c for f, c in zip(cpu["full"], cpu[mode.name], strict=True)])
        rows[mode.name] = row
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "rounds": args.rounds,
              "requests": args.requests, "modes": rows, "samples": cpu}
    (out / "levers.json").write_text(json.dumps(report, indent=2))
    lines = [f"{report['date']}; {report['machine']}; in-process, {args.requests} GET / per run, "
             f"{args.rounds} interleaved rounds; medians [min-max]; 'saves' = full minus the mode, per round", "",
             f"{'mode':20}{'CPU us/request':>24}{'x plain':>9}{'saves us':>20}  what"]
    for name, row in rows.items():
        c, saves = row["cpu_us"], row.get("saves_us")
        lines.append(f"{name:20}" + f"{c['median']:.0f} [{c['min']:.0f}-{c['max']:.0f}]".rjust(24)
                     + (f"{row['x_plain']:.2f}".rjust(9) if "x_plain" in row else " " * 9)
                     + (f"{saves['median']:.0f} [{saves['min']:.0f}-{saves['max']:.0f}]" if saves else "").rjust(20)
                     + f"  {row['what']}")
    table = "\n".join(lines)
    (out / "levers.txt").write_text(table + "\n")
    plot_levers(report, out / "levers.png")
    print("\n" + table + f"\n\nwritten: {out / 'levers.txt'}, {out / 'levers.json'}, {out / 'levers.png'}")
    return report


def plot_levers(report: dict, path: Path) -> None:
    """What each lever saves against the full set, in microseconds of CPU per request, with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, row["saves_us"]) for name, row in report["modes"].items() if "saves_us" in row]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(11, 0.4 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    med = [r["median"] for _, r in rows]
    ax.barh(y, med, xerr=[[m - r["min"] for m, (_, r) in zip(med, rows, strict=True)],
                          [r["max"] - m for m, (_, r) in zip(med, rows, strict=True)]],
            color=["tab:gray" if n == "plain" else "tab:green" if n == "lean" else "tab:blue" for n, _ in rows],
            capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [n for n, _ in rows], fontsize=9)
    full = report["modes"]["full"]["cpu_us"]["median"] if "full" in report["modes"] else float("nan")
    ax.set_xlabel(f"CPU per request saved against the full set ({full:.0f} us), us: median and min-max over "
                  f"{report['rounds']} rounds")
    ax.set_title(f"In-process, {report['requests']} GET / per run - {report['date']}, {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    from tooling.reports.compare import machine

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = [find_mode(m.strip()) for m in args.modes.split(",")]
    vegeta_binary()
    stack = NativeStack(out / "stack", keep_traces=False).up(with_app=False)
    samples: list[Sample] = []
    open_rate = args.rate
    try:
        if open_rate is None:
            # One rate every mode can serve: half the saturation of the costliest mode, the full set (every
            # lever takes something from it; `otel` and `lean` do too), measured once before the rounds.
            calibration = measure(find_mode("full"), 0, stack, args, None, out)
            open_rate = max(1, int(calibration.throughput / 2))
            print(f"open-loop rate: {open_rate} req/s, half the full set's {calibration.throughput:.0f} req/s",
                  flush=True)
        for round_ in range(1, args.rounds + 1):
            # Rotate the order each round, so no mode always runs first (or right after another).
            order = modes[round_ - 1:] + modes[:round_ - 1]
            for mode in order:
                sample = measure(mode, round_, stack, args, open_rate, out)
                samples.append(sample)
                print(f"round {round_} {mode.name:20} {sample.throughput:7.0f} req/s  "
                      f"{sample.cpu_ms_per_request:.3f} ms CPU/req  {sample.spans_per_request:.2f} spans/req  "
                      f"p50/p99 {sample.p50_ms:.1f}/{sample.p99_ms:.1f} ms at {open_rate}/s", flush=True)
    finally:
        stack.down()
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "rounds": args.rounds,
              "seconds": args.seconds, "connections": args.connections, "open_rate": open_rate,
              "modes": [m.name for m in modes], "what": {m.name: m.what for m in modes},
              "settings": {m.name: mode_settings(m, stack).overrides for m in modes},
              "summary": summarise(samples, modes), "samples": [s.__dict__ for s in samples],
              "lean_profile": load_env_file(LEAN_PROFILE)}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench.png")
    table = format_table(report)
    (out / "bench.txt").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten: {out / 'bench.txt'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.reports.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(MODE_NAMES)} (default: {', '.join(HEADLINE)}; "
                                         "with --in-process, all)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; with --in-process, 5)")
    parser.add_argument("--seconds", type=float, default=12, help="seconds per load phase (default 12)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before each measurement (default 5)")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop connections (default 8)")
    parser.add_argument("--rate", type=int, help="open-loop rate; default half the full set's saturation")
    parser.add_argument("--closed-loop", choices=("wrk", "vegeta"), default="wrk",
                        help="closed-loop load generator (default wrk, from Debian's packages)")
    parser.add_argument("--out", default=str(REPO_ROOT / ".cache" / "bench"), help="where the outputs go")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME:K=V,...",
                        help="an extra mode: the full set with these settings on top (add NAME to --modes)")
    parser.add_argument("--in-process", action="store_true",
                        help="instead of the benchmark: the lever table, each mode's WSGI callable driven in-process")
    parser.add_argument("--requests", type=int, default=5000, help="requests per in-process run (default 5000)")
    parser.add_argument("--profile", metavar="MODE",
                        help="instead of the benchmark: where MODE spends its CPU, from Pyroscope's own samples")
    args = parser.parse_args(argv)
    args.modes = args.modes or ",".join(MODE_NAMES if args.in_process else HEADLINE)
    args.rounds = args.rounds or (5 if args.in_process else 3)
    VARIANTS.update({name: Mode(name, f"full with {settings}", settings, lever=True)
                     for name, settings in args.variant})
    try:
        if args.profile:
            result = profile_mode(args.profile, args, Path(args.out))
            Path(args.out, f"profile-{args.profile}.json").write_text(json.dumps(result, indent=2))
            print(f"{args.profile}: CPU samples by category (%)")
            for name, pct in result["by_category_pct"].items():
                print(f"  {pct:5.1f}  {name}")
            print("top functions, inclusive (%)")
            for frame, pct in result["top_inclusive_pct"][:25]:
                print(f"  {pct:5.1f}  {frame}")
            return 0
        if args.in_process:
            in_process(args)
            return 0
        run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
