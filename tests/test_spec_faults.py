"""Whatever bytes an operator (or a broken editor, or an attacker with write access to a template)
saves, the loader answers with a Spec or a located SpecError: never another exception, and in
bounded time and memory."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.spec import MAX_ALIASED, MAX_NODES, MAX_SPEC_BYTES, Spec, SpecError, declared_state_dir, loads

VALID = b"""\
version: 1
server: {port: 8000, port_range: [8001, 8020], settle_ms: 300}
defaults:
  n_ctx: 2048
models:
  chat:
    path: /m/chat.gguf
    aliases: [default, "gpt-4o"]
    llama: {threads: 4, parallel: 2}
    extra_args: ["--temp", "0.7"]
  embed:
    path: /m/embed.gguf
    server_type: embedding
    desired: unloaded
active: chat
"""


def outcome(data: bytes) -> Spec | SpecError:
    try:
        return loads(data, "/srv/models.yaml", env={})
    except SpecError as exc:
        return exc


def billion_laughs(levels: int = 9, width: int = 9) -> bytes:
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return ("\n".join(lines) + f"\nmodels: *a{levels}\n").encode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"version: 1\n\xff\xfe garbage\n", "models.yaml:2:1: not UTF-8 text (byte 0xff); save the file as UTF-8"),
        (b"version: 1\nmodels: \x01\n", "models.yaml:2:9: invalid YAML: character '\\x01' is not allowed"),
        (b"- !!python/object:os.system ls\n", "models.yaml:1:3: 0: tag '!!python/object:os.system' is not allowed"),
        (b"models:\n  a: !!python/object/apply:os.system [ls]\n", "models.yaml:2:6: models.a: tag '!!python/object"),
        (b"a: &a [*a]\n", "models.yaml:1:4: a.0: an alias refers to a value that contains it (a cycle)"),
        (b"[" * 5000 + b"]" * 5000, "models.yaml:1:1: invalid YAML: values nest too deeply to read"),
        (billion_laughs(), f"aliases repeat more than {MAX_ALIASED} values"),
        (b"models: [" + b"0," * 60_000 + b"0]\n", f"the file holds more than {MAX_NODES} values"),
        (b"#" * (MAX_SPEC_BYTES + 1), "the file is larger than 1024 KiB"),
        (b"models:\n  ? [a, b]\n  : {path: x.gguf}\n", "models.yaml:2:5: models: a key must be a plain name"),
        (b"models: {a: {path: 2024-13-45}}\n", "models.a.path: cannot read this value"),
    ],
    ids=["not-utf8", "control-char", "python-tag", "python-tag-in-map", "alias-cycle", "deep", "alias-bomb",
         "too-many-values", "too-big", "complex-key", "bad-timestamp"],
)
def test_hostile_files_are_located_spec_errors(data: bytes, expected: str) -> None:
    t0 = time.monotonic()
    result = outcome(data)
    assert isinstance(result, SpecError)
    assert expected in str(result)
    assert time.monotonic() - t0 < 10  # a bound, not a benchmark: the bomb used to never finish


def test_an_alias_bomb_costs_little_memory() -> None:
    tracemalloc.start()
    try:
        assert isinstance(outcome(billion_laughs()), SpecError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, peak  # it grew the daemon past 1 GiB


def test_a_utf8_byte_order_mark_is_fine() -> None:
    result = outcome(b"\xef\xbb\xbf" + VALID)
    assert isinstance(result, SpecError)  # only because /m/chat.gguf does not exist on this host
    assert all("not found" in p.message for p in result.problems)


@pytest.mark.parametrize("cut", range(0, len(VALID) + 1, 7))
def test_every_torn_prefix_is_a_spec_or_a_spec_error(cut: int) -> None:
    assert isinstance(outcome(VALID[:cut]), (Spec, SpecError))


def test_declared_state_dir_is_read_from_an_otherwise_invalid_file() -> None:
    assert declared_state_dir(b"server:\n  state_dir: /var/lib/xgen\nmodels: {a: {n_ctx: banana}}\n") == "/var/lib/xgen"
    assert declared_state_dir(b"\xff") is None
    assert declared_state_dir(billion_laughs()) is None


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for kind, pos, blob in edits:
        pos %= len(data) + 1
        if kind == 0:
            data = data[:pos]
        elif kind == 1:
            data = data[:pos] + blob + data[pos:]
        elif kind == 2:
            data = data[:pos] + data[pos + len(blob) :]
        else:
            data = data[:pos] + data[pos : pos + 40] * 3 + data[pos:]
    return data


YAMLISH = st.text(alphabet=st.sampled_from(list("ab:-&*![]{},'\"#|>?%@`\n\t 0123456789.~$\\")))


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=600),
        YAMLISH.map(str.encode),
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.binary(min_size=1, max_size=12)), max_size=4
        ).map(lambda edits: _mutate(VALID, edits)),
    )
)
def test_any_bytes_give_a_spec_or_a_spec_error(data: bytes) -> None:
    assert isinstance(outcome(data), (Spec, SpecError))
