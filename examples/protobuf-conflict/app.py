"""A service that still carries the OpenCensus protos: its sampling configuration, as the wire format the
OpenCensus agent reads. It imports generated code of an old protoc at start, which needs protobuf < 4.

Nothing of OpenTelemetry in it: the stack is to observe it as it is (issue 21), and the injection must not
break it (zerocode's preflight starts it uninstrumented, and says why).
"""

from flask import Flask, jsonify
from google.protobuf import __version__ as protobuf_version
from opencensus.proto.trace.v1 import trace_config_pb2

SAMPLING_PROBABILITY = 0.25

app = Flask(__name__)


@app.get("/trace-config")
def trace_config():
    config = trace_config_pb2.TraceConfig(
        probability_sampler=trace_config_pb2.ProbabilitySampler(samplingProbability=SAMPLING_PROBABILITY),
        max_number_of_attributes=32,
    )
    wire = config.SerializeToString()
    decoded = trace_config_pb2.TraceConfig.FromString(wire)
    # Which protobuf runtime served the request: the app's own, unless something shadows it.
    return jsonify(protobuf=protobuf_version, bytes=wire.hex(),
                   sampling_probability=decoded.probability_sampler.samplingProbability)
