"""Hypothesis strategies that build any protobuf request from its message descriptor, and a few
mutations of a valid one; used by test_fuzz.py against every RPC of the mesh.

Every field type is covered: numbers at their extremes (NaN, infinities, the largest and smallest
integers), short and long unicode strings and bytes, enum values the build knows and numbers it does
not, nested messages to a bounded depth, repeated fields of a bounded length, maps, oneofs (one member
at most), and google.protobuf.Timestamp and Duration with seconds and nanos out of their range.
"""

import math
from functools import cache
from typing import Any

from google.protobuf import descriptor, message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

FieldDescriptor = descriptor.FieldDescriptor
# How deep nested messages go, and how long repeated fields and maps grow.
MAX_DEPTH = 3
MAX_REPEATED = 3

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# Lengths around the mesh's bounds (an echo's 64 characters, ids' 128/256, URIs' 2048, prompts' 10,000)
# and far past them.
LONG_LENGTHS = (63, 64, 65, 128, 129, 255, 256, 257, 2048, 2049, 10_000, 10_001, 100_000)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Any integer of the range, its edges and small numbers more often than chance would."""
    edges = sorted({low, high, low + 1, high - 1, *(v for v in (0, -1, 1) if low <= v <= high)})
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -1000), 1000))


def floats(width: int) -> st.SearchStrategy[float]:
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300 if width == 64 else 1e-30]
    specials.append(1e300 if width == 64 else 3.0e38)
    return st.one_of(st.sampled_from(specials), st.floats(width=width), st.floats(-100, 10_000, width=width))


def long_text() -> st.SearchStrategy[str]:
    return st.builds(
        lambda length, char: char * length,
        st.sampled_from(LONG_LENGTHS),
        st.sampled_from(["x", "é", "\u4e2d", "\U0001f600", "\x00"]),
    )


def strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=24),
        st.text(st.characters(codec="ascii"), max_size=12),
        st.sampled_from(
            [
                "",
                " ",
                "\n",
                "default",
                "USD",
                "local",
                "quick_social",
                "brand_campaign",
                "../..",
                "https://example.com/a.png",
                "gs://b/o",
                "file:///etc/passwd",
            ]
        ),
        long_text(),
    )


def blobs() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=32),
        st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"]),
        st.builds(lambda n: b"\x00" * n, st.sampled_from((1024, 65_536, 1_000_000))),
    )


def enums(field: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [value.number for value in field.enum_type.values]
    return st.one_of(st.sampled_from(known), integers(*INT32))


SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: lambda: floats(64),
    FieldDescriptor.TYPE_FLOAT: lambda: floats(32),
    FieldDescriptor.TYPE_INT32: lambda: integers(*INT32),
    FieldDescriptor.TYPE_SINT32: lambda: integers(*INT32),
    FieldDescriptor.TYPE_SFIXED32: lambda: integers(*INT32),
    FieldDescriptor.TYPE_INT64: lambda: integers(*INT64),
    FieldDescriptor.TYPE_SINT64: lambda: integers(*INT64),
    FieldDescriptor.TYPE_SFIXED64: lambda: integers(*INT64),
    FieldDescriptor.TYPE_UINT32: lambda: integers(*UINT32),
    FieldDescriptor.TYPE_FIXED32: lambda: integers(*UINT32),
    FieldDescriptor.TYPE_UINT64: lambda: integers(*UINT64),
    FieldDescriptor.TYPE_FIXED64: lambda: integers(*UINT64),
    FieldDescriptor.TYPE_BOOL: st.booleans,
    FieldDescriptor.TYPE_STRING: strings,
    FieldDescriptor.TYPE_BYTES: blobs,
}


def _time_like(cls: type[message.Message]) -> st.SearchStrategy[message.Message]:
    """Timestamp or Duration: sensible values, the edges of their range, and past them."""
    seconds = st.one_of(
        st.integers(1_600_000_000, 1_900_000_000),
        st.integers(-10, 100_000),
        st.sampled_from(
            [
                -62_135_596_801,
                -62_135_596_800,
                253_402_300_799,
                253_402_300_800,
                315_576_000_000,
                315_576_000_001,
                -315_576_000_001,
            ]
        ),
        integers(*INT64),
    )
    nanos = st.one_of(st.just(0), st.integers(0, 999_999_999), st.sampled_from([-1, 10**9]), integers(*INT32))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    """One value of a (singular) field, or None where depth ends the recursion."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enums(field)
    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        if depth >= MAX_DEPTH:
            return None
        return messages(field.message_type, depth + 1)
    return SCALARS[field.type]()


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if _is_map(field):
        entry = field.message_type
        key = field_values(entry.fields_by_name["key"], depth)
        value = field_values(entry.fields_by_name["value"], depth)
        if key is None or value is None:
            return None
        return st.dictionaries(key, value, max_size=MAX_REPEATED)
    value = field_values(field, depth)
    if value is None:
        return None
    if _repeated(field):
        return st.lists(value, max_size=MAX_REPEATED)
    return value


def _real_oneof(field: FieldDescriptor) -> descriptor.OneofDescriptor | None:
    oneof = field.containing_oneof
    if oneof is None or (len(oneof.fields) == 1 and field.has_presence and oneof.name.startswith("_")):
        return None  # proto3 `optional`: a synthetic oneof of one field
    return oneof


@cache
def messages(message_descriptor: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[message.Message]:
    """Any message of the descriptor's type: each field set or not, nested ones to MAX_DEPTH."""
    cls = GetMessageClass(message_descriptor)
    if message_descriptor.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return _time_like(cls)
    plain: dict[str, st.SearchStrategy[Any]] = {}
    oneofs: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {}
    for field in message_descriptor.fields:
        strategy = _field_strategy(field, depth)
        if strategy is None:
            continue
        oneof = _real_oneof(field)
        if oneof is None:
            plain[field.name] = strategy
        else:
            oneofs.setdefault(oneof.name, []).append((field.name, strategy))
    parts = [st.fixed_dictionaries({}, optional=plain)]
    for members in oneofs.values():
        choices = [st.just({})] + [st.builds(lambda v, n=name: {n: v}, s) for name, s in members]
        parts.append(st.one_of(choices))

    def build(dicts: tuple[dict[str, Any], ...]) -> message.Message:
        fields: dict[str, Any] = {}
        for part in dicts:
            fields.update(part)
        return cls(**fields)

    return st.tuples(*parts).map(build)


def _leaf_paths(message_descriptor: descriptor.Descriptor, depth: int = 0) -> list[tuple[str, ...]]:
    """The paths of a message's fields a mutation may replace: every field, nested ones to MAX_DEPTH."""
    paths: list[tuple[str, ...]] = []
    for field in message_descriptor.fields:
        paths.append((field.name,))
        if (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not _repeated(field)
            and depth < MAX_DEPTH
            and field.message_type.full_name not in ("google.protobuf.Timestamp", "google.protobuf.Duration")
        ):
            paths += [(field.name, *rest) for rest in _leaf_paths(field.message_type, depth + 1)]
    return paths


def _replace(request: message.Message, path: tuple[str, ...], value: Any) -> None:
    target = request
    for name in path[:-1]:
        target = getattr(target, name)
    field = target.DESCRIPTOR.fields_by_name[path[-1]]
    target.ClearField(path[-1])
    if _is_map(field):
        getattr(target, path[-1]).update(value)
    elif _repeated(field):
        getattr(target, path[-1]).extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, path[-1]).CopyFrom(value)
    else:
        setattr(target, path[-1], value)


def mutations(valid: message.Message, max_changes: int = 2) -> st.SearchStrategy[message.Message]:
    """The valid request as it is, or with one or two of its fields (at any depth) replaced by a
    generated value of the field's type, or cleared: requests that pass most checks and fail one."""
    paths = _leaf_paths(valid.DESCRIPTOR)

    @st.composite
    def mutated(draw: st.DrawFn) -> message.Message:
        request = type(valid)()
        request.CopyFrom(valid)
        for _ in range(draw(st.integers(0, max_changes))):
            path = draw(st.sampled_from(paths))
            parent = valid.DESCRIPTOR
            for name in path[:-1]:
                parent = parent.fields_by_name[name].message_type
            field = parent.fields_by_name[path[-1]]
            strategy = _field_strategy(field, MAX_DEPTH - 1)
            if strategy is None or draw(st.integers(0, 9)) == 0:
                _clear(request, path)
            else:
                _replace(request, path, draw(strategy))
        return request

    return mutated()


def _clear(request: message.Message, path: tuple[str, ...]) -> None:
    target = request
    for name in path[:-1]:
        target = getattr(target, name)
    target.ClearField(path[-1])


def varint(value: int) -> bytes:
    """An unsigned number as protobuf encodes it on the wire."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def unknown_fields() -> st.SearchStrategy[bytes]:
    """Fields no request type declares (numbers from 1000, under the 19000 protobuf reserves), of each
    wire type: what a newer client sends, and what makes even a request type without fields vary."""
    number = st.integers(1000, 18_999)
    one = st.one_of(
        st.builds(lambda n, v: varint(n << 3) + varint(v), number, st.integers(0, 2**64 - 1)),
        st.builds(lambda n, b: varint(n << 3 | 1) + b, number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: varint(n << 3 | 2) + varint(len(b)) + b, number, st.binary(max_size=16)),
        st.builds(lambda n, b: varint(n << 3 | 5) + b, number, st.binary(min_size=4, max_size=4)),
    )
    return st.lists(one, max_size=3).map(b"".join)


def _with_unknown(request: message.Message, unknown: bytes) -> message.Message:
    request.MergeFromString(unknown)
    return request


def requests(
    message_descriptor: descriptor.Descriptor, valid: list[message.Message] | None = None
) -> st.SearchStrategy[message.Message]:
    """Requests of the type: generated from its descriptor, and mutations of the valid ones given, some
    with unknown fields besides."""
    known = messages(message_descriptor)
    if valid:
        known = st.one_of(known, *(mutations(request) for request in valid))
    return st.builds(_with_unknown, known, unknown_fields())


def short(request: message.Message, limit: int = 300) -> str:
    """A request as a failure report shows it: its text format on one line, cut."""
    text = repr(type(request).__name__) + " " + str(request).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({request.ByteSize()} bytes)"
