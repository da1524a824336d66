"""Capture sinks for the backends that cannot run on a machine without Docker (Tempo, Loki, the Pyroscope
server), and for where Alertmanager's notifications would go (an e-mail or chat service).

They only receive and decode, with real libraries: opentelemetry-proto for OTLP, protobuf for the Pyroscope
push body and the pprof inside it, json for Alertmanager's webhook. They never stand in for a component that
can run here (the collector, Prometheus, Alertmanager): the tests use them where Tempo, Loki, Pyroscope or
a notification receiver would sit.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PUSH_PATH = "/push.v1.PusherService/Push"


def any_value(value: AnyValue):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


# --------------------------------------------------------------------------------------------------- OTLP


@dataclass
class CapturedSpan:
    resource: dict
    span: Span

    @property
    def attributes(self) -> dict:
        return attributes(self.span.attributes)

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def is_root(self) -> bool:
        return not self.span.parent_span_id

    @property
    def is_error_with_exception(self) -> bool:
        """Status error, with the exception recorded as the span's one event (what /fail must leave)."""
        return self.span.status.code == Status.STATUS_CODE_ERROR and [e.name for e in self.span.events] == ["exception"]


def _span_count(request: trace_service_pb2.ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


@dataclass
class HistogramPoint:
    resource: dict
    attributes: dict
    count: int
    time_unix_nano: int


class OtlpSink:
    """An OTLP/gRPC endpoint (traces, metrics, logs) that keeps every request it is sent."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True):
        self._lock = threading.Lock()
        # keep=False only counts spans, for long runs (the benchmark) where keeping every request would
        # grow without bound.
        self.keep = keep
        self.span_count = 0
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.log_requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        # A fault mode for traces, see refuse_traces(): the gRPC status every Export is answered with.
        self._trace_refusal: tuple[grpc.StatusCode, str] | None = None
        self.refused_spans = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        sink = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - gRPC method name
                refusal = sink._trace_refusal
                if refusal is not None:
                    with sink._lock:
                        sink.refused_spans += _span_count(request)
                    context.abort(*refusal)  # raises: the caller gets the status, nothing is kept
                sink._keep(sink.trace_requests, request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                sink._keep(sink.metric_requests, request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request, context):  # noqa: N802
                sink._keep(sink.log_requests, request)
                return logs_service_pb2.ExportLogsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"{host}:{self.port}"

    def _keep(self, bucket: list, request) -> None:
        with self._lock:
            if self.keep:
                bucket.append(request)
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.span_count += _span_count(request)

    def refuse_traces(self, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
                      message: str = "RATE_LIMITED: ingestion rate limit (15000000 bytes) exceeded") -> None:
        """From now on answer every trace Export with `code` and keep nothing, counting the spans refused
        (`refused_spans`). The default is what Tempo's distributor answers a tenant over its ingestion
        rate limit: RESOURCE_EXHAUSTED without RetryInfo, which an OTLP exporter must not retry."""
        self._trace_refusal = (code, message)

    def accept_traces(self) -> None:
        """Back to keeping every trace Export (the end of refuse_traces())."""
        self._trace_refusal = None

    def start(self) -> OtlpSink:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def spans(self) -> list[CapturedSpan]:
        with self._lock:
            requests = list(self.trace_requests)
        return [
            CapturedSpan(attributes(rs.resource.attributes), span)
            for request in requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def server_spans(self, route: str | None = None, service: str | None = None) -> list[CapturedSpan]:
        """The SERVER spans (one per request a server answered), of one http.route and one service.name if
        given (the edge in front of the app makes a SERVER span per request too)."""
        return [s for s in self.spans() if s.span.kind == Span.SPAN_KIND_SERVER
                and (route is None or s.attributes.get("http.route") == route)
                and (service is None or s.resource.get("service.name") == service)]

    def requests_by_route_and_status(self, service: str | None = None) -> Counter:
        """SERVER spans per (http.route, status code as text), the shape of locust's ground truth."""
        return Counter((s.attributes.get("http.route"), str(s.attributes.get("http.response.status_code")))
                       for s in self.server_spans(service=service))

    def histogram_points(self, name: str) -> Iterator[HistogramPoint]:
        with self._lock:
            requests = list(self.metric_requests)
        for request in requests:
            for rm in request.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name == name and metric.WhichOneof("data") == "histogram":
                            for point in metric.histogram.data_points:
                                yield HistogramPoint(resource, attributes(point.attributes), point.count,
                                                     point.time_unix_nano)

    def latest_cumulative_counts(self, name: str, keys: tuple[str, ...]) -> dict[tuple, int]:
        """Histogram counts summed over every exporting process (service.instance.id), by attribute keys.

        The SDK exports cumulative points, so the newest point per (instance, attribute set) is the total.
        """
        newest: dict[tuple, HistogramPoint] = {}
        for point in self.histogram_points(name):
            series = (point.resource.get("service.instance.id"), tuple(sorted(point.attributes.items())))
            if series not in newest or point.time_unix_nano >= newest[series].time_unix_nano:
                newest[series] = point
        totals: dict[tuple, int] = {}
        for point in newest.values():
            key = tuple(point.attributes.get(k) for k in keys)
            totals[key] = totals.get(key, 0) + point.count
        return totals


# ------------------------------------------------------------------------------------- HTTP receivers


class _HttpSink:
    """What the HTTP sinks share: a threaded server on host:port whose POSTs `answer()` handles. An
    exception there is recorded in `rejected` and answered 400, as a strict server would. `stop()` then
    `start()` is an outage and a restart on the same port. Subclasses are dataclasses with `host`, `port`
    and `rejected`, and call `_listen()` from `__post_init__`."""

    thread_name = "http-sink"

    def answer(self, path: str, headers, body: bytes, arrived: float) -> tuple[bytes, str | None]:
        """Keep what was sent; return the 200 answer's body and content type."""
        raise NotImplementedError

    def _listen(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._bind()

    def _bind(self) -> None:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                arrived = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    status, (payload, content_type) = 200, sink.answer(self.path, self.headers, body, arrived)
                except Exception as exc:  # noqa: BLE001 - record and answer 400, like a strict server
                    sink.rejected.append(f"{self.path}: {exc}")
                    status, payload, content_type = 400, b"", None
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output readable
                pass

        self._server: ThreadingHTTPServer | None = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._server.server_address[1]

    def start(self):
        if self._server is None:
            self._bind()  # a restart: the same port again
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The port refuses connections until start() again."""
        if self._server is not None:
            if self._thread is not None:  # shutdown() waits for a serve loop that never started otherwise
                self._server.shutdown()
            self._server.server_close()
            self._server, self._thread = None, None


# ---------------------------------------------------------------------------------------------- OTLP logs

LOKI_OTLP_LOGS_PATH = "/otlp/v1/logs"


@dataclass
class CapturedLogRecord:
    resource: dict
    scope: str
    record: LogRecord

    @property
    def body(self):
        return any_value(self.record.body)

    @property
    def attributes(self) -> dict:
        return attributes(self.record.attributes)

    @property
    def trace_id(self) -> str:
        """Hex, or "" for a record written outside any span."""
        return self.record.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.record.span_id.hex()

    @property
    def severity(self) -> str:
        return self.record.severity_text


@dataclass
class LogsSink(_HttpSink):
    """Loki's native OTLP endpoint as the collector's `otlp_http` exporter calls it (`POST /otlp/v1/logs`,
    protobuf, gzip): keeps every record decoded. `stop()` then `start()` is an outage and a restart on
    the same port."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # Requests that are valid protobuf except for strings that are not UTF-8, which the Python protobuf
    # runtime refuses to parse. Loki 3 accepts them and stores such a body as received (grafana/loki
    # #24574), so the sink answers as Loki does and keeps the raw bytes.
    not_utf8: list[bytes] = field(default_factory=list)

    thread_name = "logs-sink"

    def __post_init__(self):
        self._listen()
        self.address = f"http://{self.host}:{self.port}"

    def answer(self, path: str, headers, body: bytes, arrived: float) -> tuple[bytes, str | None]:
        if path != LOKI_OTLP_LOGS_PATH:
            raise ValueError(f"unexpected path {path}")
        if "protobuf" not in headers.get("Content-Type", ""):
            raise ValueError(f"unexpected content type {headers.get('Content-Type')}")
        if headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            request = logs_service_pb2.ExportLogsServiceRequest.FromString(body)
        except DecodeError:
            if not _valid_utf8_aside(body):
                raise
            request = None
        with self._lock:
            if request is None:
                self.not_utf8.append(body)
            else:
                self.requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse().SerializeToString(), "application/x-protobuf"

    def records(self, service: str | None = None) -> list[CapturedLogRecord]:
        """Every record kept, or those of one service.name."""
        with self._lock:
            requests = list(self.requests)
        kept = []
        for request in requests:
            for rl in request.resource_logs:
                resource = attributes(rl.resource.attributes)
                if service is None or resource.get("service.name") == service:
                    kept += [CapturedLogRecord(resource, sl.scope.name, record)
                             for sl in rl.scope_logs for record in sl.log_records]
        return kept


def _bytes_for_strings_twin(message_name: str, *files) -> type:
    """A message class of the same schema with every `string` field declared `bytes`: it parses what
    the real class refuses only for text that is not UTF-8 (protobuf's wire format is the same)."""
    pool = descriptor_pool.DescriptorPool()

    def loosen(messages) -> None:
        for message in messages:
            for item in message.field:
                if item.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                    item.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            loosen(message.nested_type)

    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        loosen(proto.message_type)
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(message_name))


_LENIENT_LOGS_REQUEST = _bytes_for_strings_twin(
    "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest",
    common_pb2.DESCRIPTOR, resource_pb2.DESCRIPTOR, logs_pb2.DESCRIPTOR, logs_service_pb2.DESCRIPTOR)


def _valid_utf8_aside(body: bytes) -> bool:
    """Whether `body` is a logs request that failed to parse only because some text is not UTF-8."""
    try:
        _LENIENT_LOGS_REQUEST.FromString(body)
    except DecodeError:
        return False
    return True


# ------------------------------------------------------------------------------------ Pyroscope and pprof


def _build_messages() -> dict[str, type]:
    """push.v1.PushRequest and pprof's perftools.profiles.Profile, declared field by field.

    Neither schema ships in a PyPI package; the field numbers follow grafana/pyroscope's api/push/v1
    and google/pprof's proto/profile.proto.
    """
    F = descriptor_pb2.FieldDescriptorProto
    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def message(name: str, *fields: tuple) -> descriptor_pb2.DescriptorProto:
        msg = descriptor_pb2.DescriptorProto(name=name)
        for fname, number, ftype, label, *type_name in fields:
            msg.field.add(name=fname, number=number, type=ftype, label=label,
                          type_name=type_name[0] if type_name else None)
        return msg

    pprof = descriptor_pb2.FileDescriptorProto(name="zerocode/pprof.proto", package="perftools.profiles",
                                               syntax="proto3")
    pprof.message_type.extend([
        message("Profile",
                ("sample_type", 1, F.TYPE_MESSAGE, rep, ".perftools.profiles.ValueType"),
                ("sample", 2, F.TYPE_MESSAGE, rep, ".perftools.profiles.Sample"),
                ("location", 4, F.TYPE_MESSAGE, rep, ".perftools.profiles.Location"),
                ("function", 5, F.TYPE_MESSAGE, rep, ".perftools.profiles.Function"),
                ("string_table", 6, F.TYPE_STRING, rep),
                ("time_nanos", 9, F.TYPE_INT64, opt),
                ("duration_nanos", 10, F.TYPE_INT64, opt),
                ("period_type", 11, F.TYPE_MESSAGE, opt, ".perftools.profiles.ValueType"),
                ("period", 12, F.TYPE_INT64, opt)),
        message("ValueType", ("type", 1, F.TYPE_INT64, opt), ("unit", 2, F.TYPE_INT64, opt)),
        message("Sample",
                ("location_id", 1, F.TYPE_UINT64, rep),
                ("value", 2, F.TYPE_INT64, rep),
                ("label", 3, F.TYPE_MESSAGE, rep, ".perftools.profiles.Label")),
        message("Label", ("key", 1, F.TYPE_INT64, opt), ("str", 2, F.TYPE_INT64, opt),
                ("num", 3, F.TYPE_INT64, opt)),
        message("Location", ("id", 1, F.TYPE_UINT64, opt),
                ("line", 4, F.TYPE_MESSAGE, rep, ".perftools.profiles.Line")),
        message("Line", ("function_id", 1, F.TYPE_UINT64, opt), ("line", 2, F.TYPE_INT64, opt)),
        message("Function", ("id", 1, F.TYPE_UINT64, opt), ("name", 2, F.TYPE_INT64, opt),
                ("filename", 4, F.TYPE_INT64, opt)),
    ])
    push = descriptor_pb2.FileDescriptorProto(name="zerocode/push.proto", package="push.v1", syntax="proto3")
    push.message_type.extend([
        message("PushRequest", ("series", 1, F.TYPE_MESSAGE, rep, ".push.v1.RawProfileSeries")),
        message("RawProfileSeries",
                ("labels", 1, F.TYPE_MESSAGE, rep, ".push.v1.LabelPair"),
                ("samples", 2, F.TYPE_MESSAGE, rep, ".push.v1.RawSample")),
        message("LabelPair", ("name", 1, F.TYPE_STRING, opt), ("value", 2, F.TYPE_STRING, opt)),
        message("RawSample", ("raw_profile", 1, F.TYPE_BYTES, opt), ("ID", 2, F.TYPE_STRING, opt)),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(pprof)
    pool.Add(push)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        for name in ("perftools.profiles.Profile", "push.v1.PushRequest")
    }


_MESSAGES = _build_messages()
Profile = _MESSAGES["perftools.profiles.Profile"]
PushRequest = _MESSAGES["push.v1.PushRequest"]


@dataclass
class ProfileUpload:
    """One profile series from one push: its series labels and the decoded pprof."""

    labels: dict[str, str]
    profile: object

    def _string(self, index: int) -> str:
        return self.profile.string_table[index]

    @property
    def sample_type(self) -> tuple[str, str]:
        vt = self.profile.sample_type[0]
        return self._string(vt.type), self._string(vt.unit)

    def function_names(self) -> set[str]:
        return {self._string(f.name) for f in self.profile.function}

    def functions_by_sample_label(self, key: str) -> dict[str, set[str]]:
        """Function names on the stacks of the samples carrying each value of a sample label (e.g. pid)."""
        functions = {f.id: self._string(f.name) for f in self.profile.function}
        locations = {loc.id: [functions[line.function_id] for line in loc.line] for loc in self.profile.location}
        result: dict[str, set[str]] = {}
        for sample in self.profile.sample:
            for label in sample.label:
                if self._string(label.key) == key:
                    names = result.setdefault(self._string(label.str), set())
                    for location_id in sample.location_id:
                        names.update(locations.get(location_id, ()))
        return result

    def stacks(self) -> list[tuple[list[str], int]]:
        """Every sample as (frames from the root down, value); frames are "function (file:line)"."""
        functions = {f.id: (self._string(f.name), self._string(f.filename)) for f in self.profile.function}
        locations = {loc.id: [functions[line.function_id] for line in loc.line] for loc in self.profile.location}
        result = []
        for sample in self.profile.sample:
            frames = [f"{name} ({filename})" for location_id in reversed(sample.location_id)
                      for name, filename in reversed(locations.get(location_id, []))]
            result.append((frames, sample.value[0] if sample.value else 0))
        return result

    def sample_labels(self, key: str) -> set[str]:
        return {
            self._string(label.str)
            for sample in self.profile.sample
            for label in sample.label
            if self._string(label.key) == key
        }


@dataclass
class PyroscopeSink(_HttpSink):
    """Accepts pyroscope-io's pushes (`POST /push.v1.PusherService/Push`) and keeps them decoded."""

    host: str = "127.0.0.1"
    port: int = 0
    uploads: list[ProfileUpload] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    thread_name = "pyroscope-sink"

    def __post_init__(self):
        self._listen()
        self.address = f"http://{self.host}:{self.port}"

    def answer(self, path: str, headers, body: bytes, arrived: float) -> tuple[bytes, str | None]:
        if path != PUSH_PATH:
            raise ValueError(f"unexpected path {path}")
        uploads = decode_push(body, headers.get("Content-Encoding", ""))
        with self._lock:
            self.uploads.extend(uploads)
        return b"", None

    def snapshot(self) -> list[ProfileUpload]:
        with self._lock:
            return list(self.uploads)


def _maybe_gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def decode_push(body: bytes, content_encoding: str = "gzip") -> list[ProfileUpload]:
    if "gzip" in content_encoding:
        body = gzip.decompress(body)
    request = PushRequest.FromString(body)
    uploads = []
    for series in request.series:
        labels = {pair.name: pair.value for pair in series.labels}
        for sample in series.samples:
            uploads.append(ProfileUpload(labels, Profile.FromString(_maybe_gunzip(sample.raw_profile))))
    return uploads


# ------------------------------------------------------------------------------- Alertmanager's webhook


@dataclass
class Notification:
    """One POST of Alertmanager's webhook integration: its JSON body, and when it arrived (time.time())."""

    received_at: float
    path: str
    body: dict

    @property
    def alerts(self) -> list[dict]:
        return self.body.get("alerts", [])

    def alert_names(self) -> set[str]:
        return {alert["labels"].get("alertname") for alert in self.alerts}


@dataclass
class WebhookSink(_HttpSink):
    """An HTTP receiver for Alertmanager's `webhook_configs`: keeps every notification POSTed to it
    (Alertmanager's JSON, version 4: status, receiver, groupLabels, alerts[...]) with its arrival time."""

    host: str = "127.0.0.1"
    port: int = 0
    received: list[Notification] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)

    thread_name = "webhook-sink"

    def __post_init__(self):
        self._listen()
        self.address = f"http://{self.host}:{self.port}/alerts"

    def answer(self, path: str, headers, body: bytes, arrived: float) -> tuple[bytes, str | None]:
        notification = Notification(arrived, path, json.loads(body))
        if not isinstance(notification.body, dict) or "alerts" not in notification.body:
            raise ValueError("not an Alertmanager notification (no `alerts`)")
        with self._lock:
            self.received.append(notification)
        return b"", None

    def notifications(self) -> list[Notification]:
        with self._lock:
            return list(self.received)
