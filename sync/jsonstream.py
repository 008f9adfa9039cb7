"""Read the array of a listing body (`GET /datasets`, `GET /models`) one element at a time.

`json.loads` of a million-dataset body holds the bytes, the text and every record as Python
objects at once (over a gigabyte). This reads the file in chunks and hands out each element
of the top-level array (`datasets`, `models`) as soon as it is complete. Every value is decoded by the
standard library's own decoder (`JSONDecoder.raw_decode`), so what it accepts is exactly
what `json.loads` accepts, and the body's encoding is detected as `json.loads` detects it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from sync.errors import ResponseError

CHUNK_SIZE = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
# What may follow a number that the end of the buffer cut short ("12" of "123", "1." of "1.5").
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")
_decode = json.JSONDecoder().raw_decode


class ListingStream:
    """Iterate the elements of a listing body's `key` array (at most once).

    Raises ResponseError, while iterating, when the body is not valid JSON, or not an
    object with exactly one `key` array. `seen` counts the elements handed out, and
    `text()` is the JSON text of the one handed out last (until the next is asked for).
    """

    def __init__(self, file: BinaryIO, chunk_size: int = CHUNK_SIZE, key: str = "datasets") -> None:
        self._key = key
        self._file = file
        self._chunk = chunk_size
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of _buf so far
        self._eof = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self._start = 0  # where the element handed out last starts, from the body's start
        self.seen = 0

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._listing()
        except RecursionError:
            raise ResponseError(
                f"the API response is nested too deeply to be a `{self._key}` listing"
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

    def _listing(self) -> Iterator[Any]:
        """The top level: an object whose one `key` member is the array."""
        self._skip_ws()
        if self._peek() != "{":
            document = self._value()
            raise ResponseError(
                f"the API response is a JSON {json_type(document)}, not an object with a "
                f"`{self._key}` list"
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
                if key != self._key:
                    keys.append(key)
                    self._value()
                elif found:
                    # json.loads would keep the last one silently; which list the API
                    # meant is anyone's guess, and guessing wrong deletes data.
                    raise ResponseError(
                        f"the API response has more than one `{self._key}` field; "
                        "refusing to guess which one is the listing"
                    )
                else:
                    found = True
                    yield from self._elements()
                if self._closed_by("}"):
                    break
        self._skip_ws()
        if self._peek() != "":
            self._fail("Extra data")
        if not found:
            names = ", ".join(sorted(keys)[:5]) or "none"
            raise ResponseError(f"the API response has no `{self._key}` field (keys: {names[:80]})")

    def _elements(self) -> Iterator[Any]:
        """The elements of the array at the current position, one at a time."""
        if self._peek() != "[":
            value = self._value()
            raise ResponseError(
                f"`{self._key}` in the API response is a {json_type(value)}, not a list"
            )
        self._pos += 1
        self._skip_ws()
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            self._skip_ws()
            self._start = self._offset + self._pos
            element = self._value()
            self.seen += 1
            yield element
            if self._closed_by("]"):
                return

    def text(self) -> str:
        """The JSON text of the element handed out last, exactly as the body spells it."""
        # Reading more drops only what lies before the element being decoded, so the
        # element is still in the buffer until the next one is asked for.
        return self._buf[self._start - self._offset : self._pos]

    def _closed_by(self, close: str) -> bool:
        """Consume the `,` or `close` after a member; True if it was `close`."""
        self._skip_ws()
        separator = self._peek()
        if separator != close and separator != ",":
            self._fail("Expecting ',' delimiter")
        self._pos += 1
        return separator == close

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
                # A number or literal at the very end may go on in the next chunk.
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

    def _fill(self, size: int) -> None:
        """Append at least `size` more bytes' worth of text (or reach the end)."""
        data = self._file.read(size)
        if self._decoder is None:
            while len(data) < 4 and data:
                more = self._file.read(size)
                if not more:
                    break
                data += more
            # The same detection and error handler as json.loads(bytes): a lone surrogate
            # survives decoding, and the record that holds it is rejected, not the body.
            encoding = json.detect_encoding(data)
            self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
        text = self._decoder.decode(data, final=not data)
        if not data:
            self._eof = True
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
