"""The multipart `model` field found as chunks arrive, wherever the chunks split the body."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.web.formfield import FormField, boundary_of

BOUNDARY = b"----xgen7MA4YWxkTrZu0gW"


def form(model: str, audio: bytes, model_first: bool) -> bytes:
    file_part = (b'--' + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n")
    model_part = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
                  + model.encode() + b"\r\n")
    parts = [model_part, file_part] if model_first else [file_part, model_part]
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def test_the_boundary_of_a_content_type() -> None:
    assert boundary_of(f"multipart/form-data; boundary={BOUNDARY.decode()}") == BOUNDARY
    assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"
    assert boundary_of("application/json") is None


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=60),
    st.booleans(),
)
def test_found_whatever_the_chunks(audio: bytes, sizes: list[int], model_first: bool) -> None:
    body = form("whisper-large", audio, model_first)
    field = FormField(BOUNDARY, "model")
    at, found = 0, None
    for size in sizes * (len(body) // max(1, sum(sizes)) + 1):
        found = field.feed(body[at : at + size])
        at += size
        if found is not None or at >= len(body):
            break
    assert found == "whisper-large"


def test_a_file_whose_bytes_look_like_a_header_is_not_the_field() -> None:
    """Only a part's own headers (after a boundary line) count; model2 is another field."""
    decoy = b'Content-Disposition: form-data; name="model"\r\n\r\nnot-it\r\n'
    assert FormField(BOUNDARY, "model").feed(form("right", decoy, model_first=False)) == "right"
    other = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model2"\r\n\r\nno\r\n')
    assert FormField(BOUNDARY, "model").feed(other + form("right", b"", model_first=True)) == "right"


def test_no_field_holds_at_most_a_window() -> None:
    field = FormField(BOUNDARY, "model")
    for _ in range(100):
        assert field.feed(b"x" * 65536) is None
    assert len(field._window) <= 4096  # memory stays flat however large the upload
