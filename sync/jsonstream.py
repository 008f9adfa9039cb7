"""Decode a `GET /datasets` body from a file one record at a time, never the whole body at once.

`json.loads` of a million-dataset body holds the bytes, the text and every record as Python
objects at the same time (over a gigabyte). This reads the file in chunks and hands out each
element of the top-level `datasets` array as soon as it is complete, using the standard
library's own C scanner (`JSONDecoder.raw_decode`) for every value, so what it accepts is
exactly what `json.loads` accepts.

Given the digests of records stored before (`expect`), it also recognises an element whose
text is exactly that of a stored record without decoding it: see `Known`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import json.scanner
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from functools import partial
from itertools import accumulate, repeat
from operator import add, eq, getitem, itemgetter, methodcaller
from typing import Any, BinaryIO, NamedTuple

from sync.errors import ResponseError

CHUNK_SIZE = 1 << 20
# NUL and lone surrogates can only come from escapes or, in UTF-8, from the bytes of an
# encoded surrogate (json.loads decodes with `surrogatepass`): text without any needs no
# per-string check. Scanned as bytes, and only where a cheap substring test hits.
_RISKY = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\x00|\xed[\xa0-\xbf]")
# Longest risky pattern is 6 bytes; keep that much of the previous chunk to catch one
# split across two chunks.
_OVERLAP = 6
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = frozenset(" \t\n\r")
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")
_decode = json.JSONDecoder().raw_decode
# The text before the id's value, in an element that starts with its id (the API's order).
_ID_FIRST = re.compile(r'[ \t\n\r]*"dataset_id"[ \t\n\r]*:[ \t\n\r]*"')
# How much of the buffer to cut into elements at a time (and the largest element that
# can be recognised by its text): from _MIN_WINDOW after a cut that was wrong, doubling
# after each plan that held or found no separator, up to _KNOWN_WINDOW.
_KNOWN_WINDOW = 1 << 17
_MIN_WINDOW = 1 << 10
# Wrong cuts in a row (no element handed out by a plan in between) after which the stream
# stops planning: its elements hold the separator, or are laid out otherwise.
_PLAN_GIVE_UP = 256
# The C scanner behind JSONDecoder.raw_decode, without its Python wrapper.
_scan_once = json.scanner.make_scanner(json.JSONDecoder())
DIGEST_LENGTH = 32
_encode = methodcaller("encode", "utf-8", "surrogatepass")
_blake2b_16 = partial(hashlib.blake2b, digest_size=16)
_hexdigest = methodcaller("hexdigest")
_STORED_DIGEST = itemgetter(slice(DIGEST_LENGTH, None))


def record_digest(inner: str) -> str:
    """The digest of an object element's text between its outer braces (hex, 32 chars)."""
    # The same three steps that _make_plan maps over a stretch's pieces.
    return _hexdigest(_blake2b_16(_encode(inner)))


class Known:
    """An element recognised by its digest: its text is exactly that of a record stored before.

    Text that once decoded as a valid object decodes the same way again, and whatever
    surrounds it is checked as usual, so recognising it proves it is a complete element.
    """

    __slots__ = ("dataset_id", "text")

    def __init__(self, dataset_id: str, text: str) -> None:
        self.dataset_id = dataset_id
        self.text = text

    def decode(self) -> Any:
        """The element as `json.loads` would give it."""
        return _decode("{" + self.text + "}")[0]


class KnownRun:
    """Consecutive elements recognised by their digests (see Known): their ids, in order."""

    __slots__ = ("ids", "texts")

    def __init__(self, ids: list[str], texts: list[str]) -> None:
        self.ids = ids
        self.texts = texts

    def __iter__(self) -> Iterator[Known]:
        return map(Known, self.ids, self.texts)

    def __len__(self) -> int:
        return len(self.ids)


class _Plan(NamedTuple):
    """One stretch of the buffer cut into candidate elements, each digested and looked up.

    Element k's text (between its braces) is `parts[k]`, starting at `starts[k]` (its `{`),
    with record digest `digests[k]`; `matches[k]`: it is the stored text of id `ids[k]`.
    `starts[len(parts)]` is where the element after the last piece starts.
    """

    buf: str
    parts: list[str]
    ids: list[str]
    matches: list[bool]
    digests: list[str]
    starts: list[int]

    def piece_at(self, pos: int) -> int:
        """The piece whose element starts at `pos`, or -1 if none does."""
        index = bisect_left(self.starts, pos)
        return index if index < len(self.starts) and self.starts[index] == pos else -1


class ListingStream:
    """Iterate the records of a listing body read from a binary file (at most once).

    Raises ResponseError, while iterating, when the body is not an object with exactly one
    `datasets` array. `risky` turns True once any text read so far could hold a NUL or a
    lone surrogate; a record handed out while it is False holds neither. `digest()` is the
    record_digest of the element handed out last.
    """

    def __init__(self, file: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        self._expected: Mapping[str, object] | None = None
        self._misses = 0
        self._prefix = ""
        # The element handed out last: where its text is, its digest (from a plan), or
        # itself if it was known.
        self._last: tuple[str, int, int] | str | Known | KnownRun | None = None
        self._plan: _Plan | None = None
        self._window = _KNOWN_WINDOW
        self._file = file
        self._chunk = chunk_size
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of _buf so far
        self._eof = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self._tail = b""
        self.risky = False
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._records()
        except RecursionError:
            raise ResponseError(
                "the API response is nested too deeply to be a dataset listing"
            ) from None
        except json.JSONDecodeError as exc:
            where = self._offset + exc.pos
            # Some of json's messages end in "at" already ("Unterminated string starting at").
            at = "" if exc.msg.endswith(" at") else " at"
            raise ResponseError(
                f"the API response is not valid JSON ({exc.msg}{at} character {where})"
            ) from None
        except UnicodeDecodeError as exc:
            raise ResponseError(f"the API response is not valid JSON ({exc.reason})") from None
        except ValueError as exc:  # e.g. an integer longer than Python will convert
            raise ResponseError(f"the API response is not valid JSON ({str(exc)[:80]})") from None

    def expect(self, expected: Mapping[str, object]) -> None:
        """Hand out each run of elements whose texts have the expected digests as a KnownRun.

        `expected`: dataset_id -> a 64-char str, content hash then the record_digest of the
        stored record's text (other values never match). Call before iterating.
        """
        self._expected = expected

    def digest(self) -> str | None:
        """record_digest of the element handed out last (None if it was not an object)."""
        last = self._last
        if type(last) is tuple:  # the usual case, first: once per new or changed record
            buf, start, end = last
            if buf[start : start + 1] != "{":
                return None
            return record_digest(buf[start + 1 : end - 1])
        if type(last) is str:
            return last
        if isinstance(last, Known):
            return record_digest(last.text)
        if isinstance(last, KnownRun):
            return record_digest(last.texts[-1])
        return None

    # --- the grammar of the top level ---------------------------------------------------

    def _records(self) -> Iterator[Any]:
        self._skip_ws()
        if self._peek() != "{":
            document = self._value()
            raise ResponseError(
                f"the API response is a JSON {json_type(document)}, not an object with a "
                "`datasets` list"
            )
        self._pos += 1
        keys: list[str] = []
        found = False
        self._skip_ws()
        if self._peek() == "}":
            self._pos += 1
        else:
            while True:
                self._skip_ws()
                if self._peek() != '"':
                    self._fail("Expecting property name enclosed in double quotes")
                key = self._value()
                self._skip_ws()
                if self._peek() != ":":
                    self._fail("Expecting ':' delimiter")
                self._pos += 1
                self._skip_ws()
                if key == "datasets":
                    if found:
                        # json.loads would keep the last one silently; which list the
                        # API meant is anyone's guess, and guessing wrong deletes data.
                        raise ResponseError(
                            "the API response has more than one `datasets` field; "
                            "refusing to guess which one is the listing"
                        )
                    found = True
                    yield from self._array()
                else:
                    keys.append(key)
                    self._value()
                if self._closed_by("}"):
                    break
        self._skip_ws()
        if self._peek() != "":
            self._fail("Extra data")
        if not found:
            names = ", ".join(sorted(keys)[:5]) or "none"
            raise ResponseError(f"the API response has no `datasets` field (keys: {names[:80]})")

    def _array(self) -> Iterator[Any]:
        if self._peek() != "[":
            value = self._value()
            raise ResponseError(
                f"`datasets` in the API response is a {json_type(value)}, not a list"
            )
        self._pos += 1
        self._skip_ws()
        if self._peek() == "]":
            self._pos += 1
            return
        decode = _decode
        expected = self._expected
        # `}`, what separates two elements, `{`: learnt from the first two elements.
        term = ""
        while True:
            # Fast path: the record and the separator after it lie inside the buffer.
            buf, pos = self._buf, self._pos
            if buf[pos : pos + 1] in _WS_CHARS:
                pos = _WS.match(buf, pos).end()  # type: ignore[union-attr]
            if term and self._misses < _PLAN_GIVE_UP:
                # Records one after the other, cut apart, recognised and decoded in bulk.
                self._pos = pos
                yield from self._planned(buf, pos, term)
                buf, pos = self._buf, self._pos
            try:
                record, end = decode(buf, pos)
            except json.JSONDecodeError:
                end = -1
            if 0 < end < len(buf) - 1:
                close = end
                separator = buf[end]
                if separator in _WS_CHARS:
                    end = _WS.match(buf, end).end()  # type: ignore[union-attr]
                    separator = buf[end : end + 1]
                if separator == ",":
                    self._pos = end + 1
                    self.seen += 1
                    self._last = (buf, pos, close)
                    if expected is not None and not term and type(record) is dict:
                        term = self._learn_term(buf, close, end)
                    yield record
                    continue
            # Slow path: near the end of the buffer, or malformed.
            self._pos = pos
            self._skip_ws()
            start = self._offset + self._pos
            record = self._value()
            self._last = (self._buf, start - self._offset, self._pos)
            self.seen += 1
            yield record
            if self._closed_by("]"):
                return

    def _learn_term(self, buf: str, close: int, comma: int) -> str:
        """`}`, the separator at `comma` and `{`, after the object ending at `close`; or "".

        Also learns the layout of the id at the start of the next element (`_prefix`).
        """
        after = _WS.match(buf, comma + 1).end()  # type: ignore[union-attr]
        prefix = _ID_FIRST.match(buf, after + 1)
        if buf[after : after + 1] != "{" or buf[close - 1] != "}" or prefix is None:
            return ""
        self._prefix = prefix.group()
        return buf[close - 1 : after + 1]

    def _planned(self, buf: str, pos: int, term: str) -> Iterator[Any]:
        """The elements from `pos` on, cut at each `term` ahead: KnownRuns and decoded records.

        A run of elements whose texts are stored records' comes as one KnownRun; any other
        element is decoded where its cut says it starts, and handed out only if it ends
        exactly at its cut. Leaves `_pos` at the first element that does not (it is left to
        the usual path), or after the buffer's last cut.
        """
        scan = _scan_once
        while True:
            plan = self._plan
            index = plan.piece_at(pos) if plan is not None and plan.buf is buf else -1
            if index < 0:
                plan = self._plan = self._make_plan(buf, pos, term)
                index = 0
            size = len(plan.parts)
            if size == 0:
                # No separator within reach: the end of the buffer, or a record larger than
                # the window, which the next plan may then reach.
                self._next_stretch()
                return
            matches, starts, parts, digests = plan.matches, plan.starts, plan.parts, plan.digests
            while index < size:
                if matches[index]:
                    try:
                        stop = matches.index(False, index)
                    except ValueError:
                        stop = size
                    run = KnownRun(plan.ids[index:stop], parts[index:stop])
                    self._last = run
                    self.seen += stop - index
                    self._misses = 0
                    self._pos = pos = starts[stop]
                    index = stop
                    yield run
                    continue
                start = starts[index]
                try:
                    record, end = scan(buf, start)
                except (json.JSONDecodeError, StopIteration):
                    end = -1
                if end != start + len(parts[index]) + 2:
                    # The cut is not this element's end (a `}, {` inside one of its strings
                    # or nested values, or another layout): the usual path decodes it. The
                    # plan goes on from the element after it if that starts at a cut (the
                    # usual case); otherwise the next plan is small, so a listing laid out
                    # otherwise costs little.
                    self._pos = start
                    self._window = _MIN_WINDOW
                    self._misses += 1
                    return
                self._last = digests[index]
                self._misses = 0
                self.seen += 1
                self._pos = pos = starts[index + 1]
                index += 1
                yield record
            # Every element of this plan handed out.
            self._next_stretch()

    def _next_stretch(self) -> None:
        """Let the next plan be made afresh, over a larger window than this one."""
        self._plan = None
        self._window = min(2 * self._window, _KNOWN_WINDOW)

    def _make_plan(self, buf: str, pos: int, term: str) -> _Plan:
        """Cut the buffer from `pos` at each `term` within reach; digest and look up each piece."""
        # The first `}, {` after an element's start ends it if its text is a stored
        # record's: a stored text is a whole object, and one whole object cannot be the
        # beginning of another (if a string or nested object holds `}, {`, the digest
        # misses). The same holds for a piece that decodes as a whole object. Every step
        # below is one C loop over all the pieces: this runs for every record.
        window = self._window
        cut = buf.rfind(term, pos + 1, pos + window) if buf.startswith("{", pos) else -1
        if cut < 0:
            return _Plan(buf, [], [], [], [], [pos])
        parts = buf[pos + 1 : cut].split(term)
        digests = list(map(_hexdigest, map(_blake2b_16, map(_encode, parts))))
        expected = self._expected
        if expected:
            start = len(self._prefix)
            # Only a guess at each id (it ends at the first quote, escaped or not): the
            # digest decides, and an equal digest means equal text, hence this id.
            ends = map(methodcaller("find", '"', start), parts)
            ids = list(map(getitem, parts, map(slice, repeat(start), ends)))
            # A stored value is the content hash then the record digest; ids not stored
            # get "" and miss, as does a value without a digest.
            olds = map(expected.get, ids, repeat(""))
            try:
                matches = list(map(eq, map(_STORED_DIGEST, olds), digests))
            except TypeError:
                # A value that is not a plain hashed row (another account's, or deleted):
                # such rows are never recognised.
                matches = [
                    type(old) is str and len(old) == 2 * DIGEST_LENGTH and old.endswith(digest)
                    for old, digest in zip(map(expected.get, ids, repeat("")), digests, strict=True)
                ]
        else:
            ids, matches = [], [False] * len(parts)
        # Each piece's element starts one separator after the previous piece ends.
        starts = list(accumulate(map(add, map(len, parts), repeat(len(term))), initial=pos))
        return _Plan(buf, parts, ids, matches, digests, starts)

    def _closed_by(self, close: str) -> bool:
        """Consume the `,` or `close` after a member; True if it was `close`."""
        self._skip_ws()
        separator = self._peek()
        if separator != close and separator != ",":
            self._fail("Expecting ',' delimiter")
        self._pos += 1
        return separator == close

    # --- the buffer -----------------------------------------------------------------

    def _value(self) -> Any:
        """Decode one complete JSON value at the current position."""
        want = self._chunk
        while True:
            try:
                value, end = _decode(self._buf, self._pos)
            except json.JSONDecodeError:
                if self._eof:
                    raise
                # Probably cut off by the end of the buffer: read more and try again,
                # doubling each time so a huge (or broken) value costs linear time.
                self._fill(want)
                want *= 2
                continue
            if not self._eof and (
                end == len(self._buf)
                or (_is_number(value) and _NUMBER_TAIL.fullmatch(self._buf, end))
            ):
                # A number or literal at the very end may continue in the next chunk, and a
                # number cut after its `.` or `e` decodes as its integer part: read more.
                self._fill(want)
                want *= 2
                continue
            self._pos = end
            return value

    def _skip_ws(self) -> None:
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf) or self._eof:
                return
            self._fill(self._chunk)

    def _peek(self) -> str:
        if self._pos >= len(self._buf) and not self._eof:
            self._fill(self._chunk)
        return self._buf[self._pos : self._pos + 1]

    def _fail(self, message: str) -> None:
        raise json.JSONDecodeError(message, self._buf, self._pos)

    def _scan(self, data: bytes) -> None:
        chunk = self._tail + data
        if b"\\u" in chunk or b"\x00" in chunk or b"\xed" in chunk:
            self.risky = _RISKY.search(chunk) is not None
        self._tail = chunk[-_OVERLAP:]

    def _fill(self, size: int) -> None:
        """Append at least `size` more bytes' worth of text (or reach the end)."""
        data = self._file.read(size)
        if self._decoder is None:
            while len(data) < 4 and data:
                more = self._file.read(size)
                if not more:
                    break
                data += more
            # The same detection and error handler as json.loads(bytes).
            encoding = json.detect_encoding(data)
            self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
            # The byte patterns only mean something in UTF-8: check everything otherwise.
            self.risky = encoding not in ("utf-8", "utf-8-sig")
        text = self._decoder.decode(data, final=not data)
        if not data:
            self._eof = True
        if not self.risky and data:
            self._scan(data)
        # Drop what is consumed, so the buffer holds about one chunk, not the body.
        self._offset += self._pos
        self._buf = self._buf[self._pos :] + text
        self._pos = 0


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
