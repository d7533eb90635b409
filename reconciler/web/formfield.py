"""One field of a multipart/form-data body, found as the body's chunks arrive (pure).

An audio upload names its model in a form field, which may come before or after the file. The
proxy forwards the body's bytes untouched, so it only needs that one value: it feeds chunks here
until the value is complete, holding nothing of the body itself but a short window where a
part's headers may straddle two chunks.
"""

from __future__ import annotations

import re

HEADER_WINDOW = 4096  # a part's headers are short; longer text between chunks is file data
VALUE_LIMIT = 1024  # a model name is short: a longer "value" is not one


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data; boundary=…` content type, or None."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1).encode() if match else None


class FormField:
    def __init__(self, boundary: bytes, name: str) -> None:
        # a part's headers right after a boundary line (a file's bytes never hold the boundary)
        self._header = re.compile(
            rb"--" + re.escape(boundary) + rb"\r\n(?:[^\r\n]+\r\n)*?"
            rb'content-disposition:[ \t]*form-data;[^\r\n]*?\bname="' + re.escape(name.encode()) + rb'"[^\r\n]*\r\n'
            rb"(?:[^\r\n]+\r\n)*\r\n",
            re.IGNORECASE,
        )
        self._end = b"\r\n--" + boundary
        self._window = b""
        self._value: bytearray | None = None  # collecting, once the field's headers were seen
        self.found: str | None = None

    def feed(self, chunk: bytes) -> str | None:
        """The field's value once it is complete (then every later call returns it too)."""
        if self.found is not None:
            return self.found
        if self._value is None:
            data = self._window + chunk
            match = self._header.search(data)
            if match is None:
                self._window = data[-HEADER_WINDOW:]
                return None
            self._value = bytearray()
            chunk = data[match.end() :]
        self._value += chunk
        end = self._value.find(self._end)
        if end >= 0:
            self.found = bytes(self._value[:end]).decode(errors="replace").strip()
        elif len(self._value) > VALUE_LIMIT + len(self._end):
            self.found = ""  # not a name: give up rather than hold a file
        return self.found
