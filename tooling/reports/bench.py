"""What observing costs: the app's CPU, throughput, latency and memory per mode, measured side by side.

    python -m tooling.reports.bench                      # the default run, about 10 minutes
    python -m tooling.reports.bench --rounds 1 --seconds 5 --modes plain,otel

Modes, all on the same gunicorn settings (app/app.env):
    plain           the owners' command alone (`gunicorn`): the app with its own metrics only
    otel            under opentelemetry-instrument, exporting traces and metrics to the real collector
    otel+pyroscope  the same plus the zerocode Pyroscope hook (span profiles)
    lean            otel+pyroscope with app/profile-lean.env on top (README, "What observing costs")

The modes run interleaved, round after round, because these machines are noisy: a slow minute hits
every mode alike. Per mode and round: the app's CPU per request (gunicorn's master and workers, from
/proc), saturation throughput (closed loop), p50 and p99 latency at a fixed open-loop rate of half the
plain app's saturation, RSS per worker, and the pipeline's own cost (collector and Prometheus CPU per
1,000 requests, and their RSS). The load generator is vegeta, built from its Go module into .cache/.
Reports medians and spreads (min-max) and ratios to plain, as a table, bench.json and bench.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tooling.builds import binary
from tooling.config import load_env_file
from tooling.native.stack import APP_DIR, REPO_ROOT, AppSettings, NativeStack, start_app

MODES = ("plain", "otel", "otel+pyroscope", "lean")
LEAN_PROFILE = APP_DIR / "profile-lean.env"


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


# Extra modes from --variant NAME:KEY=VALUE,...: otel+pyroscope with those settings on top.
VARIANTS: dict[str, dict[str, str]] = {}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, settings = text.partition(":")
    pairs = [item.partition("=") for item in settings.split(",") if item]
    if not sep or not name or not pairs or any(not key or not eq for key, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, {key: value for key, _, value in pairs}


def mode_settings(mode: str, stack: NativeStack) -> AppSettings:
    overrides = {}
    if mode == "lean":
        overrides = load_env_file(LEAN_PROFILE)
    elif mode in VARIANTS:
        overrides = VARIANTS[mode]
    profiled = mode in ("otel+pyroscope", "lean") or mode in VARIANTS
    return AppSettings(otlp_endpoint=f"http://127.0.0.1:{stack.ports.otlp_grpc}",
                       pyroscope_address=stack.pyroscope_sink.address if profiled else None,
                       overrides=overrides, instrumented=mode != "plain")


@dataclass
class Sample:
    mode: str
    round: int
    requests: int
    throughput: float
    cpu_ms_per_request: float
    open_rate: int
    p50_ms: float
    p99_ms: float
    worker_rss_mib: float
    collector_cpu_ms_per_1k: float
    prometheus_cpu_ms_per_1k: float
    collector_rss_mib: float
    prometheus_rss_mib: float
    errors: int


def measure(mode: str, round_: int, stack: NativeStack, args, open_rate: int | None, run_dir: Path) -> Sample:
    import psutil

    settings = mode_settings(mode, stack)
    app = start_app(settings, run_dir / f"{mode}-{round_}")
    try:
        master = psutil.Process(app.process.pid)
        deadline = time.monotonic() + 20
        while len(master.children()) < int(load_env_file(APP_DIR / "app.env")["GUNICORN_WORKERS"]):
            if time.monotonic() > deadline:
                raise BenchError(f"{mode}: gunicorn's workers did not start")
            time.sleep(0.2)
        url = f"{settings.url}/"
        attack(url, 5, None, args.connections, args.closed_loop)  # warm-up: imports, first exports, caches
        pids = [master.pid] + [c.pid for c in master.children()]
        pipeline = [stack.collector.process.pid, stack.prometheus.process.pid]
        app_cpu, collector_cpu, prometheus_cpu = cpu_seconds(pids), cpu_seconds(pipeline[:1]), cpu_seconds(pipeline[1:])
        closed = attack(url, args.seconds, None, args.connections, args.closed_loop)
        app_cpu = cpu_seconds(pids) - app_cpu
        collector_cpu = cpu_seconds(pipeline[:1]) - collector_cpu
        prometheus_cpu = cpu_seconds(pipeline[1:]) - prometheus_cpu
        rate = open_rate or max(1, int(closed["throughput"] / 2))
        opened = attack(url, args.seconds, rate, args.connections * 4)
        workers = [c.pid for c in master.children()]
        per_1k = 1000 / max(1, closed["requests"])
        errors = closed["non_200"] + opened["non_200"]
        return Sample(
            mode=mode, round=round_, requests=closed["requests"], throughput=closed["throughput"],
            cpu_ms_per_request=1000 * app_cpu / max(1, closed["requests"]), open_rate=rate,
            p50_ms=opened["p50_ms"], p99_ms=opened["p99_ms"],
            worker_rss_mib=statistics.mean(rss_mib(p) for p in workers),
            collector_cpu_ms_per_1k=1000 * collector_cpu * per_1k,
            prometheus_cpu_ms_per_1k=1000 * prometheus_cpu * per_1k,
            collector_rss_mib=rss_mib(pipeline[0]), prometheus_rss_mib=rss_mib(pipeline[1]), errors=errors)
    finally:
        app.stop()


FIGURES = (("cpu_ms_per_request", "app CPU per request (ms)", "{:.3f}"), ("throughput", "saturation (req/s)", "{:.0f}"),
           ("p50_ms", "p50 at open rate (ms)", "{:.1f}"), ("p99_ms", "p99 at open rate (ms)", "{:.1f}"),
           ("worker_rss_mib", "RSS per worker (MiB)", "{:.0f}"),
           ("collector_cpu_ms_per_1k", "collector CPU per 1k req (ms)", "{:.0f}"),
           ("prometheus_cpu_ms_per_1k", "Prometheus CPU per 1k req (ms)", "{:.0f}"),
           ("collector_rss_mib", "collector RSS (MiB)", "{:.0f}"),
           ("prometheus_rss_mib", "Prometheus RSS (MiB)", "{:.0f}"))


def summarise(samples: list[Sample], modes: list[str]) -> dict:
    summary = {}
    for mode in modes:
        rows = [s for s in samples if s.mode == mode]
        summary[mode] = {key: {"median": statistics.median(getattr(s, key) for s in rows),
                               "min": min(getattr(s, key) for s in rows), "max": max(getattr(s, key) for s in rows)}
                         for key, _, _ in FIGURES}
        summary[mode]["errors"] = sum(s.errors for s in rows)
    if "plain" in summary:
        base = summary["plain"]
        for mode in modes:
            for key, ratio in (("cpu_ms_per_request", "cpu_ratio"), ("throughput", "throughput_ratio")):
                summary[mode][ratio] = summary[mode][key]["median"] / base[key]["median"]
    return summary


def format_table(report: dict) -> str:
    modes = report["modes"]
    lines = [f"{report['date']}; {report['machine']}; {report['rounds']} interleaved rounds of {report['seconds']} s, "
             f"{report['connections']} connections; open-loop rate {report['open_rate']} req/s",
             "medians, [min-max] over rounds", ""]
    width = 26
    lines.append(f"{'':32}" + "".join(f"{m:>{width}}" for m in modes))
    for key, label, fmt in FIGURES:
        cells = []
        for m in modes:
            v = report["summary"][m][key]
            cells.append(f"{fmt.format(v['median'])} [{fmt.format(v['min'])}-{fmt.format(v['max'])}]".rjust(width))
        lines.append(f"{label:32}" + "".join(cells))
    if "plain" in report["summary"]:
        lines.append(f"{'CPU per request, x plain':32}" + "".join(
            f"{report['summary'][m]['cpu_ratio']:>{width}.2f}" for m in modes))
        lines.append(f"{'throughput, x plain':32}" + "".join(
            f"{report['summary'][m]['throughput_ratio']:>{width}.2f}" for m in modes))
    lines.append(f"{'non-200 answers':32}" + "".join(f"{report['summary'][m]['errors']:>{width}}" for m in modes))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    panels = [("cpu_ms_per_request", "app CPU per request (ms)"), ("throughput", "saturation throughput (req/s)"),
              ("p99_ms", f"p99 at {report['open_rate']} req/s open loop (ms)"),
              ("worker_rss_mib", "RSS per worker (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.8))
    colors = [plt.cm.tab10(i) for i in range(len(modes))]
    for ax, (key, title) in zip(axes, panels, strict=True):
        med = [report["summary"][m][key]["median"] for m in modes]
        low = [med[i] - report["summary"][m][key]["min"] for i, m in enumerate(modes)]
        high = [report["summary"][m][key]["max"] - med[i] for i, m in enumerate(modes)]
        bars = ax.bar(range(len(modes)), med, yerr=[low, high], capsize=4, color=colors[:len(modes)])
        if "plain" in modes and key in ("cpu_ms_per_request", "throughput"):
            base = report["summary"]["plain"][key]["median"]
            for bar, value, m in zip(bars, med, modes, strict=True):
                top = report["summary"][m][key]["max"]  # above the error bar
                ax.annotate(f"x{value / base:.2f}", (bar.get_x() + bar.get_width() / 2, top),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=9)
        if key == "p99_ms":
            ax.set_yscale("log")  # a saturated mode's p99 is seconds, the plain app's milliseconds
        ax.set_xticks(range(len(modes)), [m.replace("+", "+\n") for m in modes], fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"What observing costs: medians over {report['rounds']} interleaved rounds (bars: min-max) — "
                 f"{report['date']}, {report['machine']}", fontsize=9)
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


def profile_mode(mode: str, args, out: Path) -> dict:
    """Profile one mode under closed-loop load with the Pyroscope hook's own flame graph data."""
    stack = NativeStack(out / "profile-stack", keep_traces=False).up(with_app=False)
    try:
        settings = mode_settings(mode, stack)
        settings.pyroscope_address = stack.pyroscope_sink.address
        settings.overrides = {**settings.overrides, "PYROSCOPE_UPLOAD_INTERVAL": "2"}
        app = start_app(settings, out / f"profile-{mode}")
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


def run(args) -> dict:
    from tooling.reports.compare import machine

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(modes) - set(MODES) - set(VARIANTS)
    if unknown:
        raise BenchError(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    vegeta_binary()
    stack = NativeStack(out / "stack", keep_traces=False).up(with_app=False)
    samples: list[Sample] = []
    open_rate = args.rate
    try:
        for round_ in range(1, args.rounds + 1):
            # Rotate the order each round, so no mode always runs first (or right after another).
            order = modes[round_ - 1:] + modes[:round_ - 1] if "plain" not in modes or open_rate else \
                ["plain"] + [m for m in modes if m != "plain"]
            for mode in order:
                sample = measure(mode, round_, stack, args, open_rate, out)
                if open_rate is None and mode == "plain":
                    open_rate = sample.open_rate  # half the plain app's saturation, fixed from here on
                samples.append(sample)
                print(f"round {round_} {mode:15} {sample.throughput:7.0f} req/s  {sample.cpu_ms_per_request:.3f} ms CPU"
                      f"/req  p99 {sample.p99_ms:6.1f} ms at {sample.open_rate}/s", flush=True)
    finally:
        stack.down()
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "rounds": args.rounds,
              "seconds": args.seconds, "connections": args.connections, "open_rate": open_rate, "modes": modes,
              "summary": summarise(samples, modes), "samples": [s.__dict__ for s in samples],
              "lean_profile": load_env_file(LEAN_PROFILE) if "lean" in modes else None}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "bench.png")
    table = format_table(report)
    (out / "bench.txt").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten: {out / 'bench.txt'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.reports.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per measurement (default 20)")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop connections (default 8)")
    parser.add_argument("--rate", type=int, help="open-loop rate; default half the plain app's saturation")
    parser.add_argument("--closed-loop", choices=("wrk", "vegeta"), default="wrk",
                        help="closed-loop load generator (default wrk, from Debian's packages)")
    parser.add_argument("--out", default=str(REPO_ROOT / ".cache" / "bench"), help="where the outputs go")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="NAME:K=V,...",
                        help="an extra mode: otel+pyroscope with these settings on top (add NAME to --modes)")
    parser.add_argument("--profile", metavar="MODE",
                        help="instead of the benchmark: where MODE spends its CPU, from Pyroscope's own samples")
    args = parser.parse_args(argv)
    VARIANTS.update(dict(args.variant))
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
        run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
