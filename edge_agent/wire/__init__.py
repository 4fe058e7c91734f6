"""Wire formats of the device contract: topics, messages and telemetry codecs (README §1–§2).

>>> batch = decode_telemetry(b'{"v":1,"seq":0,"boot":1,"ts_ms":0,"param_version":1,'
...                          b'"features":[[0.25]],"pred":[0],"conf":[0.5]}')
>>> decode_telemetry(encode_binary(batch, frac_bits=8)) == batch
True
"""

from edge_agent.wire._json import DEFAULT_MAX_BYTES, Payload
from edge_agent.wire.errors import REASONS, Reason, WireError
from edge_agent.wire.messages import (
    ACK_CODE_REASONS,
    MAX_FEATURES,
    MAX_READINGS,
    STATE_CODE,
    WIRE_VERSION,
    AckCode,
    AckReason,
    AckState,
    Capabilities,
    ChunkRequest,
    LabelBatch,
    Manifest,
    ManifestParam,
    ManifestSignature,
    Status,
    TelemetryBatch,
    TransferSpec,
    TrialSpec,
    UpdateAck,
    UpdateState,
)
from edge_agent.wire.telemetry_binary import (
    HEADER_SIZE,
    decode_binary,
    encode_binary,
    encode_binary_raw,
    quantise_conf,
    quantise_features,
    round_half_away,
)
from edge_agent.wire.telemetry_codec import decode_telemetry
from edge_agent.wire.telemetry_json import decode_json, encode_json
from edge_agent.wire.topics import (
    PREFIX,
    Leaf,
    Topic,
    parse_topic,
    subscription,
    topic,
    validate_id,
)

__all__ = [
    "ACK_CODE_REASONS",
    "DEFAULT_MAX_BYTES",
    "HEADER_SIZE",
    "MAX_FEATURES",
    "MAX_READINGS",
    "PREFIX",
    "REASONS",
    "STATE_CODE",
    "WIRE_VERSION",
    "AckCode",
    "AckReason",
    "AckState",
    "Capabilities",
    "ChunkRequest",
    "LabelBatch",
    "Leaf",
    "Manifest",
    "ManifestParam",
    "ManifestSignature",
    "Payload",
    "Reason",
    "Status",
    "TelemetryBatch",
    "Topic",
    "TransferSpec",
    "TrialSpec",
    "UpdateAck",
    "UpdateState",
    "WireError",
    "decode_binary",
    "decode_json",
    "decode_telemetry",
    "encode_binary",
    "encode_binary_raw",
    "encode_json",
    "parse_topic",
    "quantise_conf",
    "quantise_features",
    "round_half_away",
    "subscription",
    "topic",
    "validate_id",
]
