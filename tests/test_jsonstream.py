"""ListingStream: the records it yields are json.loads's, at every chunk size, or a ResponseError.

The oracle is the standard library: a body the stream accepts must give exactly the
`datasets` list `json.loads(body)` gives, however the body is cut into chunks; a body it
refuses must be one json.loads refuses, or one of the documented refusals (not an object, no
or two `datasets` fields, `datasets` not a list); and it never raises anything but
ResponseError. A NUL or a lone surrogate is handed out as decoded (the record is then
rejected by the parser), never replaced.
"""

from __future__ import annotations

import codecs
import io
import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from sync.errors import ResponseError
from sync.jsonstream import CHUNK_SIZE, ListingStream

# None: the default chunk size (1 MiB), so the whole of a small body is one chunk.
CHUNK_SIZES: list[int | None] = [1, 2, 3, 7, 64, None]
ENCODINGS = [
    "utf-8",
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "utf-32-le",
    "utf-32-be",
]
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def stream(body: bytes, chunk_size: int | None) -> ListingStream:
    """A ListingStream over `body` with `chunk_size` (None: the default)."""
    if chunk_size is None:
        return ListingStream(io.BytesIO(body))
    return ListingStream(io.BytesIO(body), chunk_size=chunk_size)


def canonical(value: Any) -> str:
    """JSON text of a decoded value that tells apart what == does not (True and 1, -0.0 and 0.0)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


def expected(body: bytes) -> list[Any] | None:
    """The `datasets` list the stream must yield for `body`, or None if it must refuse it."""
    pairs_seen: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        pairs_seen.append([key for key, _ in pairs])
        return dict(pairs)

    try:
        document = json.loads(body, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    # The outermost object is the last one the hook completes.
    if pairs_seen[-1].count("datasets") != 1 or not isinstance(document["datasets"], list):
        return None
    return document["datasets"]


def check_body(body: bytes, chunk_sizes: list[int | None] = CHUNK_SIZES) -> None:
    """The stream yields what json.loads says at every chunk size, or raises ResponseError."""
    want = expected(body)
    for chunk_size in chunk_sizes:
        records = stream(body, chunk_size)
        if want is None:
            with pytest.raises(ResponseError):
                list(records)
        else:
            got = list(records)
            assert canonical(got) == canonical(want), f"chunk_size={chunk_size}"
            assert records.seen == len(want)


# --- generated bodies ---------------------------------------------------------------------

whitespace = st.text(alphabet=" \t\n\r", max_size=3)
integers = st.from_regex(r"-?(0|[1-9][0-9]{0,40})", fullmatch=True)
# Any JSON number: 1e5, 1E+05, -0, 0.5, 12.50e-3, and integers beyond 64 bits.
numbers = st.from_regex(
    r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)
chars = st.one_of(
    st.characters(),
    st.sampled_from(["\ufeff", "\u2028", "😀", '"', "\\", "/", "\n", "\t", "é", "\x7f"]),
)
# A NUL or a lone surrogate somewhere in a string: decoded as json.loads decodes it.
unstorable_texts = st.builds(
    lambda before, bad, after: before + bad + after,
    st.text(chars, max_size=3),
    st.sampled_from(["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\udfff\ud800"]),
    st.text(chars, max_size=3),
)
texts = st.one_of(
    st.text(chars, max_size=12),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "😀", "é", " "]), st.integers(20, 300)),
    unstorable_texts,
)


@st.composite
def string_tokens(draw: st.DrawFn, text: st.SearchStrategy[str] = texts) -> str:
    """A JSON string: escaped as ASCII, or raw Unicode (lone surrogates and all)."""
    return json.dumps(draw(text), ensure_ascii=draw(st.booleans()))


literals = st.sampled_from(["true", "false", "null"])


@st.composite
def arrays(draw: st.DrawFn, items: st.SearchStrategy[str]) -> str:
    """A JSON array of `items`, with whitespace drawn around every token."""
    values = draw(st.lists(items, max_size=4))
    if not values:
        return "[" + draw(whitespace) + "]"
    return "[" + ",".join(draw(whitespace) + v + draw(whitespace) for v in values) + "]"


def joined_members(draw: st.DrawFn, members: list[tuple[str, str]]) -> str:
    """`key: value` pairs joined by commas, with whitespace drawn around every token."""
    ws = whitespace
    return ",".join(
        draw(ws) + key + draw(ws) + ":" + draw(ws) + value + draw(ws) for key, value in members
    )


@st.composite
def objects(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    """A JSON object of `values` under string keys, with whitespace drawn around every token."""
    members = draw(st.lists(st.tuples(string_tokens(), values), max_size=4))
    if not members:
        return "{" + draw(whitespace) + "}"
    return "{" + joined_members(draw, members) + "}"


json_values = st.recursive(
    st.one_of(literals, numbers, string_tokens()),
    lambda inner: st.one_of(arrays(inner), objects(inner)),
    max_leaves=10,
)
dataset_like = st.builds(
    lambda i, name, extra: json.dumps(
        {
            "dataset_id": f"ds-{i}",
            "name": name,
            "user_id": "u",
            "creation_time": "2024-12-15T17:32:00.965408+00:00",
            "cover_asset_identifier": {"asset_type": "RESPONSE", "asset_id": f"c{i}"},
            **extra,
        },
        ensure_ascii=False,
    ),
    st.integers(0, 10**6),
    texts,
    st.dictionaries(
        st.sampled_from(["score", "tags", "n"]), st.floats(allow_nan=False), max_size=2
    ),
)
records = st.one_of(
    dataset_like,
    arrays(json_values),
    objects(json_values),
    literals,
    numbers,
    string_tokens(),
)
top_level_values = st.one_of(
    literals, numbers, string_tokens(), arrays(json_values), objects(json_values)
)


@st.composite
def listing_texts(draw: st.DrawFn) -> str:
    """{"datasets": [...], other fields...} with whitespace between every pair of tokens."""
    listing = draw(arrays(records))
    key_text = st.text(chars, max_size=8).filter(lambda k: k != "datasets")
    others = draw(st.lists(st.tuples(string_tokens(key_text), top_level_values), max_size=3))
    members = [(json.dumps("datasets"), listing), *others]
    at = draw(st.integers(0, len(others)))
    members.insert(at, members.pop(0))
    return draw(whitespace) + "{" + joined_members(draw, members) + "}" + draw(whitespace)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A listing as bytes: mostly UTF-8, sometimes with a BOM, in UTF-16 or in UTF-32."""
    text = draw(listing_texts())
    encoding = draw(st.one_of(st.just("utf-8"), st.sampled_from(ENCODINGS)))
    # json.loads(bytes) decodes with `surrogatepass`: a raw lone surrogate is readable.
    return text.encode(encoding, "surrogatepass")


@given(body=bodies())
@SETTINGS
def test_generated_listings_decode_as_json_loads_does(body: bytes) -> None:
    note(repr(body))
    want = expected(body)
    assert want is not None, "the generator makes valid listings only"
    for chunk_size in CHUNK_SIZES:
        records = stream(body, chunk_size)
        got = list(records)
        assert canonical(got) == canonical(want), f"chunk_size={chunk_size}"
        assert records.seen == len(want)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes deleted, inserted, replaced, or cut off at the end."""
    body = bytearray(draw(bodies()))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        byte = draw(st.sampled_from(b'{}[],:" \\01e.-+tfnu\x00\xff\xc3'))
        if kind == "delete":
            del body[at : at + 1]
        elif kind == "insert":
            body.insert(at, byte)
        elif kind == "replace" and body:
            body[at] = byte
        else:
            del body[at:]
    return bytes(body)


@given(body=mutated())
@SETTINGS
def test_mutated_bodies_decode_or_raise_response_error(body: bytes) -> None:
    note(repr(body))
    check_body(body)


# --- hand-written bodies ------------------------------------------------------------------

VALID = [
    b'{"datasets": []}',
    b'{"datasets":[]}',
    b' \t\r\n{ \n"datasets" \t:\r\n[ ] \n}\n\t ',
    b'{"datasets": [123456789]}',
    b'{"datasets": [-0, 0, 1, -1, 100000000000000000000000000000000000000001]}',
    b'{"datasets": [true, false, null, "", "a", [], {}, [[]], {"": {}}]}',
    b'{"datasets": [{"n": 1e5, "m": -0.0, "k": 1E+05, "j": 12.50e-3, "i": -0}]}',
    b'{"datasets": [[1e5, 2.5, -3E-2]], "x": [0.5], "y": {"z": 1e999}}',
    b'{"datasets": ["\\u00e9\\ud83d\\ude00\\"\\\\\\/\\b\\f\\n\\r\\t"]}',
    '{"datasets": ["é😀中\u2028"], "ü": "\ufeff"}'.encode(),
    b'{"a": 1, "datasets": [1, 2], "b": {"datasets": 3}, "c": [{"datasets": []}]}',
    b'{"d\\u0061tasets": [7]}',
    b'{"datasets": [NaN, Infinity, -Infinity]}',
    b'{"datasets": [{"dataset_id": "a"}, {"dataset_id": "a"}]}',
    b'{"datasets": ["' + b"x" * 5000 + b'", ' + b"7" * 4000 + b"]}",
    b'{"datasets": [' + b"[" * 200 + b"]" * 200 + b"]}",
    b'{"datasets": [' + b", ".join(b"%d" % i for i in range(300)) + b"]}",
]


@pytest.mark.parametrize("body", VALID, ids=range(len(VALID)))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_valid_bodies_decode_as_json_loads_does(body: bytes, encoding: str) -> None:
    encoded = body.decode("utf-8").encode(encoding)
    assert expected(encoded) is not None
    check_body(encoded)


@pytest.mark.parametrize(
    "token",
    [
        b"123456789",
        b"-123456789",
        b"-0",
        b"10000000000000000000000000000000000000000",
        b"true",
        b"false",
        b"null",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b'"abcdefgh"',
        b'"\\u00e9\\ud83d\\ude00"',
    ],
)
def test_top_level_tokens_split_by_any_chunk_boundary_decode_whole(token: bytes) -> None:
    body = b'{"datasets": [' + token + b", " + token + b'], "total": ' + token + b"}"
    want = json.loads(body)["datasets"]
    for chunk_size in range(1, len(body) + 2):
        got = list(stream(body, chunk_size))
        assert canonical(got) == canonical(want), f"chunk_size={chunk_size}"


def test_integer_split_across_chunks_decodes_whole() -> None:
    for chunk_size in (1, 2, 3, 4):
        assert list(stream(b'{"datasets": [123456789]}', chunk_size)) == [123456789]


def test_top_level_fraction_split_by_chunk_boundary() -> None:
    tokens = [b"1.5", b"-2.25", b"1e5", b"1E+05", b"12.5e-3", b"0.0", b"6.02E23"]
    for token in tokens:
        body = b'{"datasets": [' + token + b'], "total": ' + token + b"}"
        want = json.loads(body)["datasets"]
        for chunk_size in range(1, len(body) + 2):
            got = list(stream(body, chunk_size))
            assert canonical(got) == canonical(want), f"{token!r} chunk_size={chunk_size}"


def test_top_level_fraction_at_the_default_chunk_boundary() -> None:
    head = b'{"datasets": [], "padding": "'
    tail = b'", "score": 1.'
    body = head + b"x" * (CHUNK_SIZE - len(head) - len(tail)) + tail + b"5}"
    assert body[:CHUNK_SIZE].endswith(b": 1.")
    assert json.loads(body)["datasets"] == []
    assert list(ListingStream(io.BytesIO(body))) == []


def truncation_source() -> bytes:
    """A small valid listing with every kind of token, to cut off at each byte."""
    return json.dumps(
        {
            "a": [1, {"b": None}],
            "datasets": [
                {"dataset_id": "x", "n": -1.5e3, "s": "é\n\u00e9😀", "t": [True, False]},
                12,
                "s",
            ],
            "z": 0,
        },
        ensure_ascii=False,
    ).encode()


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32-le"])
def test_every_truncation_raises_response_error(encoding: str) -> None:
    body = truncation_source().decode().encode(encoding)
    check_body(body)  # the whole body is valid
    for end in range(len(body)):
        cut = body[:end]
        assert expected(cut) is None, end
        for chunk_size in CHUNK_SIZES:
            with pytest.raises(ResponseError):
                list(stream(cut, chunk_size))


INVALID = [
    b"",
    b" \n",
    b"{",
    b"}",
    b"{}",
    b"[]",
    b"null",
    b"1",
    b'"datasets"',
    b'[{"datasets": []}]',
    b'{"datasets": [1,]}',
    b'{"datasets": [1 2]}',
    b'{"datasets": [,1]}',
    b'{"datasets" [1]}',
    b'{"datasets"; [1]}',
    b"{datasets: [1]}",
    b"{'datasets': [1]}",
    b'{"datasets": [1]} x',
    b'{"datasets": [1]}}',
    b'{"datasets": [1]},',
    b'{"datasets": [1]} {}',
    b'{"datasets": [1]]',
    b'{"datasets": [1}',
    b'{"datasets": [1], }',
    b'{, "datasets": [1]}',
    b'{"datasets": [1] "x": 2}',
    b'{"datasets": {}}',
    b'{"datasets": null}',
    b'{"datasets": "[]"}',
    b'{"datasets": 1.5}',
    b'{"other": []}',
    b'{"datasets": [], "datasets": []}',
    b'{"datasets": [1], "x": 1, "datasets": [2]}',
    b'{"datasets": [01]}',
    b'{"datasets": [1.]}',
    b'{"datasets": [.5]}',
    b'{"datasets": [+1]}',
    b'{"datasets": [1e]}',
    b'{"datasets": [tru]}',
    b'{"datasets": [nan]}',
    b'{"datasets": ["\x01"]}',
    b'{"datasets": ["\\x41"]}',
    b'{"datasets": ["\\ud8"]}',
    b'{"datasets": ["abc]}',
    b'{"datasets": ["\xff"]}',
    b'{"datasets": ["\xc3"]}',
    b"\xef\xbb\xbf\xef\xbb\xbf" + b'{"datasets": []}',
    b'{"datasets": []}\x00',
    b'{"datasets": [' + b"9" * 5000 + b"]}",
    b'{"datasets": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    b'{"datasets": [], "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
]


@pytest.mark.parametrize("body", INVALID, ids=range(len(INVALID)))
def test_invalid_bodies_raise_response_error_at_every_chunk_size(body: bytes) -> None:
    assert expected(body) is None
    for chunk_size in CHUNK_SIZES:
        records = stream(body, chunk_size)
        with pytest.raises(ResponseError) as caught:
            list(records)
        assert str(caught.value)


def test_invalid_utf16_and_utf32_raise_response_error() -> None:
    for body in [
        '{"datasets": []}'.encode("utf-16-le") + b"\x00",  # an odd byte at the end
        '{"datasets": [1]}'.encode("utf-32-be")[:-2],
        '{"datasets": ["a"]}'.encode("utf-16")[:-1],
    ]:
        assert expected(body) is None
        for chunk_size in CHUNK_SIZES:
            with pytest.raises(ResponseError):
                list(stream(body, chunk_size))


# --- streaming: a bounded amount read before the first record -----------------------------


class GeneratedFile:
    """A read-only binary file whose bytes come from a generator; counts the bytes read."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._pending = bytearray()
        self._done = False
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all that is left when size < 0), b"" at the end."""
        while not self._done and (size < 0 or len(self._pending) < size):
            try:
                self._pending += next(self._pieces)
            except StopIteration:
                self._done = True
        cut = len(self._pending) if size < 0 else size
        data = bytes(self._pending[:cut])
        del self._pending[:cut]
        self.bytes_read += len(data)
        return data


RECORDS = 50_000


def large_listing(count: int = RECORDS) -> Iterator[bytes]:
    """A listing of `count` records (about 240 bytes each), one record at a time."""
    yield b'{"count": 50000, "datasets": [\n'
    for i in range(count):
        record = {
            "dataset_id": f"ds-{i:07d}",
            "name": f"Dataset number {i} " + "n" * (i % 50),
            "user_id": f"user-{i % 7}",
            "creation_time": "2024-12-15T17:32:00.965408+00:00",
            "cover_asset_identifier": {"asset_type": "RESPONSE", "asset_id": f"cov-{i}"},
        }
        yield json.dumps(record).encode() + (b",\n" if i < count - 1 else b"\n")
    yield b'], "next": null}'


@pytest.mark.parametrize("chunk_size", [4096, None])
def test_first_record_comes_after_about_one_chunk(chunk_size: int | None) -> None:
    size = chunk_size or CHUNK_SIZE
    total = sum(len(piece) for piece in large_listing())
    assert total > 8 * size
    file = GeneratedFile(large_listing())
    records = (
        ListingStream(file) if chunk_size is None else ListingStream(file, chunk_size=chunk_size)
    )
    iterator = iter(records)
    first = next(iterator)
    assert first["dataset_id"] == "ds-0000000"
    assert file.bytes_read <= 2 * size
    assert records.seen == 1


def test_reading_stays_about_one_chunk_ahead_of_the_records() -> None:
    chunk_size = 4096
    file = GeneratedFile(large_listing())
    records = ListingStream(file, chunk_size=chunk_size)
    consumed = len(b'{"count": 50000, "datasets": [\n')
    ahead = 0
    count = 0
    for index, record in enumerate(records):
        assert record["dataset_id"] == f"ds-{index:07d}"
        consumed += len(json.dumps(record)) + 2
        ahead = max(ahead, file.bytes_read - consumed)
        count += 1
    assert count == RECORDS and records.seen == RECORDS
    assert 0 < ahead <= 2 * chunk_size


def test_memory_stays_about_one_chunk_while_streaming() -> None:
    chunk_size = 4096
    file = GeneratedFile(large_listing(10_000))
    records = ListingStream(file, chunk_size=chunk_size)
    tracemalloc.start()
    try:
        count = sum(1 for _ in records)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 10_000
    assert file.bytes_read > 2_000_000
    # The buffer holds about a chunk (plus one record), never the body read so far.
    assert peak < 64 * chunk_size


def split_reads(body: bytes, sizes: Callable[[int], int]) -> GeneratedFile:
    """A file over `body` whose generator hands it out in pieces of sizes(i) bytes."""

    def pieces() -> Iterator[bytes]:
        at = i = 0
        while at < len(body):
            step = sizes(i)
            yield body[at : at + step]
            at += step
            i += 1

    return GeneratedFile(pieces())


def test_short_reads_from_the_file_decode_whole() -> None:
    # A file (a pipe, a socket) may return fewer bytes than asked for.
    body = json.dumps({"datasets": [{"n": 123456789, "s": "é😀"}, 42, "x" * 100]}).encode()
    for step in (1, 2, 3, 5):
        file = split_reads(body, lambda _i, step=step: step)
        assert list(ListingStream(file, chunk_size=64)) == json.loads(body)["datasets"]


def test_utf16_surrogate_pairs_split_across_chunks() -> None:
    document = {"datasets": ["😀" * 5, {"k😀": "🀄x"}], "e": "😀"}
    for encoding in ("utf-16-le", "utf-16-be", "utf-16", "utf-32"):
        body = json.dumps(document, ensure_ascii=False).encode(encoding)
        for chunk_size in range(1, 12):
            records = stream(body, chunk_size)
            assert list(records) == document["datasets"], (encoding, chunk_size)


def test_bom_is_skipped_like_json_loads() -> None:
    body = codecs.BOM_UTF8 + b'{"datasets": ["a"]}'
    for chunk_size in CHUNK_SIZES:
        assert list(stream(body, chunk_size)) == ["a"]
