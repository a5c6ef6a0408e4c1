"""Open Inference Protocol (KServe v2) over HTTP: request parsing and response encoding,
with Triton's binary tensor data extension (pure Python + numpy; no Ray).

A request body is JSON, or — binary extension, what ``tritonclient.http`` sends by
default — a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
bytes of every input whose ``parameters.binary_data_size`` is set, in input order. Outputs
come back as JSON ``data`` lists, or as raw bytes after the JSON header when the request
asks (``outputs[i].parameters.binary_data`` or ``parameters.binary_data_output``).

Every malformed request raises :class:`ProtocolError` (HTTP 400, or 404 for an unknown
model) whose message says what was received, what was expected and the fix. Nothing a
client sends reaches arithmetic unbounded: the JSON nesting depth, the rank, every
dimension and the element count are checked (Python ints) before any array is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgconvert.core.errors import DGConvertError
from dgconvert.core.exits import GatedResult

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

# OIP datatype <-> numpy (BYTES is not a fixed-size type: refused for tensors here)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NAMES = {dt: name for name, dt in DATATYPES.items()}

INPUT_NAME = "images"
INPUT_DATATYPES = ("UINT8", "FP32")
OUTPUTS = {"label": "INT64", "exit_stage": "INT64", "score": "FP32"}

RETRY_AFTER_S = 1  # the Retry-After of a 503 (capacity, a lost replica)
MAX_DEPTH = 64  # JSON nesting (objects and lists) a request may use
MAX_RANK = 16  # dimensions of one tensor
MAX_DIM = 2**31 - 1  # one dimension
MAX_ELEMENTS = 2**31 - 1  # elements of one tensor when the caller sets no tighter bound


class ProtocolError(DGConvertError, ValueError):
    """A request the server cannot answer; ``status`` is the HTTP status to reply with,
    ``retry_after`` (seconds) the ``Retry-After`` header of a 503."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def unavailable(message: str, retry_after: int = RETRY_AFTER_S) -> ProtocolError:
    """A 503 with ``Retry-After``: capacity or a lost replica, worth retrying."""
    return ProtocolError(message, status=503, retry_after=retry_after)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (client values quoted in errors)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def datatype_of(arr: np.ndarray) -> str:
    """The OIP datatype name of a numpy array."""
    try:
        return _NAMES[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise ProtocolError(f"no Open Inference Protocol datatype for numpy {arr.dtype}") from None


@dataclass
class Tensor:
    """One named input tensor of a request."""

    name: str
    datatype: str
    data: np.ndarray


@dataclass
class InferRequest:
    """A parsed inference request: inputs, and which outputs to return how."""

    inputs: list[Tensor]
    outputs: list[str] | None = None  # None: every output
    binary: dict[str, bool] = field(default_factory=dict)  # output name -> binary?
    binary_default: bool = False  # request-level parameters.binary_data_output
    id: str | None = None

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _header_length(value: str | int | None, body_len: int) -> int | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise ProtocolError(f"header {HEADER_LENGTH} is {short(value)}; expected the JSON "
                            "header's length in bytes (a non-negative integer)")
    n = int(text)
    if not 0 <= n <= body_len:
        raise ProtocolError(f"header {HEADER_LENGTH} is {n} but the body has {body_len} bytes; "
                            "expected 0 <= length <= body size. Fix: send the byte length of "
                            "the JSON part")
    return n


def json_depth(text: bytes | memoryview) -> int:
    """The deepest nesting of objects and lists in JSON ``text`` (brackets inside strings
    do not count; a linear numpy scan, no recursion)."""
    a = np.frombuffer(text, dtype=np.uint8)
    if not a.size:
        return 0
    quote = a == ord('"')
    if quote.any():
        back = a == ord("\\")
        pos = np.arange(a.size)
        last_plain = np.maximum.accumulate(np.where(back, -1, pos))  # last non-backslash
        run = np.empty(a.size, dtype=np.int64)  # backslashes right before each byte
        run[0] = 0
        run[1:] = pos[:-1] - last_plain[:-1]
        opens = quote & (run % 2 == 0)  # an unescaped quote opens or closes a string
        in_string = (np.cumsum(opens) - opens) % 2 == 1
        code = ~in_string & ~opens
    else:
        code = np.ones(a.size, dtype=bool)
    step = (code & ((a == ord("[")) | (a == ord("{")))).astype(np.int64)
    step -= code & ((a == ord("]")) | (a == ord("}")))
    return int(np.cumsum(step).max())


def _json_object(text: bytes, what: str) -> dict[str, Any]:
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{what} nests JSON {depth} levels deep; this server takes at "
                            f"most {MAX_DEPTH}. Fix: send tensor data flat (\"data\": [...] "
                            "in row-major order) or nested no deeper than the shape")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{what} nests JSON too deeply to parse; expected at most "
                            f"{MAX_DEPTH} levels. Fix: send tensor data flat") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data":
            raise ProtocolError(f"{what} is not valid JSON ({exc}): bytes follow the JSON. "
                                f"Fix: binary tensor data needs the {HEADER_LENGTH} header "
                                "(the JSON part's length)") from None
        raise ProtocolError(f"{what} is not valid JSON ({exc}); expected an object like "
                            '{"inputs": [{"name": ..., "shape": [...], "datatype": ..., '
                            '"data": [...]}]}') from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is a JSON {type(obj).__name__}; expected a JSON object")
    return obj


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    p = obj.get("parameters", {})
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise ProtocolError(f"{where}.parameters is {type(p).__name__}; expected an object")
    return p


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(f"{where}.shape is {short(value)}; expected a list of "
                            "non-negative integers, e.g. [1, 3, 128, 128]")
    if len(value) > MAX_RANK or any(d > MAX_DIM for d in value):
        raise ProtocolError(f"{where}.shape is {short(value)}; expected at most {MAX_RANK} "
                            f"dimensions of at most {MAX_DIM} each. Fix: send the tensor's "
                            "real shape, e.g. [N, 1, 28, 28]")
    return tuple(value)


def element_count(shape: Sequence[int], limit: int) -> int:
    """The elements of ``shape`` (Python ints, exact), or ``limit + 1`` as soon as the
    running product passes ``limit`` (a zero dimension still gives 0)."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            return limit + 1
    return count


def parse_infer_request(body: bytes, header_length: str | int | None = None,
                        max_elements: int | None = None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors).

    ``max_elements`` bounds the elements of any one input (oversized requests are refused
    before their data is decoded)."""
    n = _header_length(header_length, len(body))
    head, blob = (body, b"") if n is None else (body[:n], memoryview(body)[n:])
    obj = _json_object(head, "the request" if n is None else "the request's JSON header")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError(f"the request has inputs={short(raw_inputs)}; expected a "
                            "non-empty list of input tensors")
    inputs: list[Tensor] = []
    offset = 0
    for i, t in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise ProtocolError(f"{where} is a {type(t).__name__}; expected an object")
        name, datatype = t.get("name"), t.get("datatype")
        if not isinstance(name, str):
            raise ProtocolError(f"{where}.name is {short(name)}; expected a string")
        where = f"input {short(name, 40)}"
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ProtocolError(f"{where} has datatype {short(datatype)}; expected one of "
                                f"{', '.join(DATATYPES)}")
        shape = _shape(t.get("shape"), where)
        dtype = DATATYPES[datatype]
        limit = MAX_ELEMENTS if max_elements is None else min(max_elements, MAX_ELEMENTS)
        count = element_count(shape, limit)
        if count > limit:
            raise ProtocolError(f"{where} has shape {short(list(shape))} (more than {limit} "
                                f"elements); this server takes at most {limit} per request. "
                                "Fix: split the batch into smaller requests")
        size = _params(t, where).get("binary_data_size")
        if size is not None:
            if n is None:
                raise ProtocolError(f"{where} sets binary_data_size but the request has no "
                                    f"{HEADER_LENGTH} header; expected the header with the "
                                    "JSON part's length (binary tensor data extension)")
            if not isinstance(size, int) or isinstance(size, bool) or \
                    size != count * dtype.itemsize:
                raise ProtocolError(f"{where} has binary_data_size {short(size)}; expected "
                                    f"{count * dtype.itemsize} bytes for {datatype} "
                                    f"{list(shape)}")
            if offset + size > len(blob):
                raise ProtocolError(f"{where} needs bytes {offset}..{offset + size} of the "
                                    f"binary part, which has {len(blob)}; expected the raw "
                                    "tensors after the JSON header, in input order")
            arr = np.frombuffer(blob[offset:offset + size], dtype=dtype.newbyteorder("<"))
            offset += size
        else:
            if "data" not in t:
                raise ProtocolError(f"{where} has neither data nor "
                                    "parameters.binary_data_size; expected one of them")
            arr = _json_data(t["data"], dtype, count, where)
        inputs.append(Tensor(name, datatype, arr.reshape(shape)))
    if offset != len(blob):
        raise ProtocolError(f"the request carries {len(blob)} binary bytes but its inputs "
                            f"declare {offset}; expected the two to match")
    return InferRequest(inputs, *_requested_outputs(obj), id=_request_id(obj))


def _json_data(data: Any, dtype: np.dtype, count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]  # a lone number, or something refused below
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        arr = None
    if arr is None or arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}.data is not a (nested) list of numbers; expected "
                            f"{count} numbers, flat or nested")
    if arr.size != count:
        raise ProtocolError(f"{where}.data holds {arr.size} values; its shape needs {count}")
    if arr.size == 0:
        return np.zeros(0, dtype)
    if dtype.kind in "ui" and arr.dtype.kind == "f":
        raise ProtocolError(f"{where}.data holds non-integers for an integer datatype; "
                            "expected whole numbers")
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ProtocolError(f"{where}.data holds values in [{arr.min()}, {arr.max()}], "
                                f"outside {dtype.name}'s [{info.min}, {info.max}]")
    return arr.astype(dtype).reshape(-1)


def _requested_outputs(obj: Mapping[str, Any]) -> tuple[list[str] | None, dict[str, bool], bool]:
    default = bool(_params(obj, "the request").get("binary_data_output", False))
    raw = obj.get("outputs")
    if raw is None:
        return None, {}, default
    if not isinstance(raw, list):
        raise ProtocolError(f"outputs is a {type(raw).__name__}; expected a list of "
                            '{"name": ...} objects')
    names, binary = [], {}
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError(f"outputs[{i}] is {short(o)}; expected an object with a name")
        p = _params(o, f"outputs[{i}]")
        if "classification" in p:
            raise ProtocolError(f"output {short(o['name'], 40)} asks for classification; this "
                                "server returns label/score outputs instead (drop the "
                                "parameter)")
        names.append(o["name"])
        if "binary_data" in p:
            binary[o["name"]] = bool(p["binary_data"])
    return names, binary, default


def _request_id(obj: Mapping[str, Any]) -> str | None:
    rid = obj.get("id")
    return None if rid is None else str(rid)


def encode_infer_response(model_name: str, model_version: str | None,
                          outputs: Sequence[tuple[str, np.ndarray]], binary: Mapping[str, bool],
                          request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON header + binary outputs when any
    output is binary (``Inference-Header-Content-Length`` then names the header's size)."""
    entries, blobs = [], []
    for name, arr in outputs:
        arr = np.ascontiguousarray(arr)
        e: dict[str, Any] = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary.get(name, False):
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            e["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            e["data"] = arr.reshape(-1).tolist()
        entries.append(e)
    obj: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        obj["model_version"] = model_version
    if request_id is not None:
        obj["id"] = request_id
    head = json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
    if not blobs:
        return head, {"content-type": JSON_TYPE}
    return b"".join([head, *blobs]), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(head))}


def encode_infer_request(inputs: Sequence[tuple[str, np.ndarray]], binary: bool = True,
                         outputs: Sequence[str] | None = None, binary_outputs: bool = True,
                         request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A request body and headers (the client side; tests and tools without tritonclient)."""
    entries, blobs = [], []
    for name, arr in inputs:
        arr = np.ascontiguousarray(arr)
        e: dict[str, Any] = {"name": name, "datatype": datatype_of(arr), "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            e["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            e["data"] = arr.reshape(-1).tolist()
        entries.append(e)
    obj: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        obj["id"] = request_id
    if outputs is not None:
        obj["outputs"] = [{"name": o, "parameters": {"binary_data": binary_outputs}}
                          for o in outputs]
    elif binary_outputs:
        obj["parameters"] = {"binary_data_output": True}
    head = json.dumps(obj, separators=(",", ":")).encode()
    if not binary:
        return head, {"content-type": JSON_TYPE}
    return b"".join([head, *blobs]), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(head))}


def decode_infer_response(body: bytes, header_length: str | int | None = None
                          ) -> dict[str, np.ndarray]:
    """Output name -> array of a response (JSON or with binary outputs)."""
    n = _header_length(header_length, len(body))
    head, blob = (body, b"") if n is None else (body[:n], body[n:])
    obj = _json_object(head, "the response")
    out, offset = {}, 0
    for o in obj.get("outputs", []):
        dtype, shape = DATATYPES[o["datatype"]], tuple(o["shape"])
        size = _params(o, "output").get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(blob[offset:offset + size], dtype=dtype.newbyteorder("<"))
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(shape)
    return out


# -- the model this server exposes ------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What a served bundle looks like from the protocol's side."""

    name: str
    input_shape: tuple[int, ...]  # per sample, e.g. (3, 128, 128)
    num_stages: int
    version: str = "1"
    platform: str = "dgconvert"

    def metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``."""
        return {
            "name": self.name, "versions": [self.version], "platform": self.platform,
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32",
                        "shape": [-1, *self.input_shape],
                        "parameters": {"datatypes": list(INPUT_DATATYPES)}}],
            "outputs": [{"name": k, "datatype": v, "shape": [-1]} for k, v in OUTPUTS.items()],
        }

    def index_entry(self) -> dict[str, Any]:
        """One entry of ``POST /v2/repository/index``."""
        return {"name": self.name, "version": self.version, "state": "READY"}

    def images(self, req: InferRequest, max_rows: int | None = None) -> np.ndarray:
        """The request's ``images`` as uint8 or float32 ``[N, *input_shape]``, checked."""
        names = [t.name for t in req.inputs]
        expected = f"[N, {', '.join(map(str, self.input_shape))}]"
        if names != [INPUT_NAME]:
            raise ProtocolError(f"the request has inputs {short(names)}; model {self.name!r} takes one "
                                f"input {INPUT_NAME!r} (UINT8 or FP32 {expected})")
        t = req.inputs[0]
        if t.datatype not in INPUT_DATATYPES:
            raise ProtocolError(f"input {INPUT_NAME!r} has datatype {t.datatype}; expected "
                                "UINT8 (raw pixels) or FP32 (normalized). Fix: send uint8 "
                                "pixels or float32")
        shape = t.data.shape
        if len(shape) != len(self.input_shape) + 1 or tuple(shape[1:]) != self.input_shape:
            raise ProtocolError(f"input {INPUT_NAME!r} has shape {list(shape)}; expected "
                                f"{expected} (N = batch size)")
        if max_rows is not None and shape[0] > max_rows:
            raise ProtocolError(f"input {INPUT_NAME!r} has {shape[0]} images; this server takes "
                                f"at most {max_rows} per request. Fix: split the batch")
        if t.datatype == "FP32" and t.data.size and not np.isfinite(t.data).all():
            raise ProtocolError(f"input {INPUT_NAME!r} holds NaN or Inf; expected finite values")
        return t.data

    def outputs(self, req: InferRequest, result: GatedResult
                ) -> list[tuple[str, np.ndarray]]:
        """The requested outputs of a result, in the order asked."""
        values = {"label": result.labels.astype(np.int64, copy=False),
                  "exit_stage": result.exit_stage.astype(np.int64, copy=False),
                  "score": result.scores.astype(np.float32, copy=False)}
        names = list(OUTPUTS) if req.outputs is None else req.outputs
        unknown = [n for n in names if n not in values]
        if unknown:
            raise ProtocolError(f"the request asks for outputs {short(unknown)}; model {self.name!r} "
                                f"has outputs {list(OUTPUTS)}")
        return [(n, values[n]) for n in names]

    def check_outputs(self, req: InferRequest) -> None:
        """Refuse unknown output names before running the model."""
        if req.outputs is not None:
            self.outputs(req, GatedResult.empty())
