"""Mutations of checkpoint files that a hostile or broken download could produce.

Each mutation takes the original bytes and a ``random.Random`` and returns new bytes. safetensors-aware ones
rewrite the JSON header (lying lengths and offsets, wrong dtypes and shapes, duplicated keys, absurd sizes,
non-UTF-8 and very long names); generic ones truncate, flip and splice bytes.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable

Mutation = Callable[[bytes, random.Random], bytes]


def _split(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, UnicodeDecodeError):
        return None
    return (header, data[8 + length :]) if isinstance(header, dict) else None


def _join(header: dict | str, body: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw + body


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        if buffer:
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def lying_header_length(data: bytes, rng: random.Random) -> bytes:
    value = rng.choice([0, 1, 7, len(data), len(data) * 2, 2**40, 2**63 - 1, rng.randrange(1, 4096)])
    return struct.pack("<Q", value) + data[8:]


def _with_header(edit: Callable[[dict, random.Random], None]) -> Mutation:
    def mutate(data: bytes, rng: random.Random) -> bytes:
        parts = _split(data)
        if parts is None or not _tensors(parts[0]):
            return flip_bytes(data, rng)
        header, body = parts
        edit(header, rng)
        return _join(header, body)

    mutate.__name__ = edit.__name__
    return mutate


@_with_header
def lying_offsets(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensors(header))
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = rng.choice(
        [[end, start], [start, end + rng.randint(1, 10**6)], [start + 2, end + 2], [0, 2**62], [-1, end]]
    )


@_with_header
def wrong_dtype(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensors(header))
    header[key]["dtype"] = rng.choice(["F64", "I8", "BOOL", "U8", "F8_E4M3", "XYZ", "F32", "BF16", 7])


@_with_header
def wrong_shape(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensors(header))
    header[key]["shape"] = rng.choice(
        [[], [0], [1], [0, 8], [10**12], [10**6, 10**6], [2**31, 2**31], [3, -4], [1, 1, 1, 1, 1, 1, 1], "x"]
    )


@_with_header
def absurd_but_consistent(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensors(header))
    header[key]["shape"] = [10**12, 16]  # the header says 10¹² rows; the data is what it is


@_with_header
def rename_tensor(header: dict, rng: random.Random) -> None:
    key = rng.choice(_tensors(header))
    name = rng.choice(["\udcff\udcfe" + key, key * 200, "", ".", "lora_A.weight", key.replace("lora_A", "lora_B"),
                       "<img src=x onerror=alert(1)>.lora_A.weight", key + "\n\r"])  # fmt: skip
    header[name] = header.pop(key)


@_with_header
def drop_tensor(header: dict, rng: random.Random) -> None:
    header.pop(rng.choice(_tensors(header)))


@_with_header
def bad_metadata(header: dict, rng: random.Random) -> None:
    header["__metadata__"] = rng.choice(
        [{"ss_network_alpha": "nan"}, {"ss_network_alpha": "1e309"}, {"lora_adapter_metadata": "{"}, {"x": 1}, [], "s"]
    )


def duplicate_key(data: bytes, rng: random.Random) -> bytes:
    parts = _split(data)
    if parts is None or not _tensors(parts[0]):
        return flip_bytes(data, rng)
    header, body = parts
    key = rng.choice(_tensors(header))
    text = json.dumps(header)
    entry = json.dumps({key: header[key]})[1:-1]
    return _join(text[:-1] + ", " + entry + "}", body)


def nonfinite_values(data: bytes, rng: random.Random) -> bytes:
    """Overwrite some bytes of the tensor data with NaN/Inf patterns of float32 and bf16."""
    parts = _split(data)
    if parts is None:
        return flip_bytes(data, rng)
    body = parts[1]
    buffer = bytearray(body)
    pattern = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xc0\x7f", b"\x80\xff"])
    for _ in range(rng.randint(1, 8)):
        if len(buffer) > 4:
            at = rng.randrange(len(buffer) - len(pattern))
            buffer[at : at + len(pattern)] = pattern
    return data[: len(data) - len(body)] + bytes(buffer)


SAFETENSORS_MUTATIONS: tuple[Mutation, ...] = (
    truncate,
    flip_bytes,
    lying_header_length,
    lying_offsets,
    wrong_dtype,
    wrong_shape,
    absurd_but_consistent,
    rename_tensor,
    drop_tensor,
    bad_metadata,
    duplicate_key,
    nonfinite_values,
)
BYTES_MUTATIONS: tuple[Mutation, ...] = (truncate, flip_bytes)


def json_mutation(data: bytes, rng: random.Random) -> bytes:
    """A config or manifest with a field replaced by a hostile value."""
    try:
        value = json.loads(data)
    except ValueError:
        return flip_bytes(data, rng)
    if not isinstance(value, dict) or not value:
        return flip_bytes(data, rng)
    key = rng.choice(sorted(value))
    value[key] = rng.choice(
        [None, -1, 0, 10**9, 1e308, float("nan"), "x" * 10_000, [], {}, [1, "a"], {"(": 1}, True, "../../etc/passwd"]
    )
    return json.dumps(value, allow_nan=True).encode()
