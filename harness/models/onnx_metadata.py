"""The settings an exported ONNX file carries (its preprocessing and label map), so the file alone reproduces the
PyTorch run it came from. Written by `harness export-onnx` into the model's `metadata_props` under one key;
read back here without onnx, onnxruntime or torch, by walking the file's top-level protobuf fields, so a run can
know its preprocessing before its decoders start and before any of those load. The export cache's entries carry
the engine's verdict the same way (harness/pipeline/engine.py), appended to the export's bytes."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

from harness.errors import ModelError

METADATA_KEY = "harness.settings"
METADATA_PROPS_FIELD = 14  # ModelProto.metadata_props (onnx.proto)
LENGTH_DELIMITED, VARINT, FIXED64, FIXED32 = 2, 0, 1, 5


def _varint(data: Any, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(data: Any, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field between start and end; others skipped."""
    found, position = [], start
    while position < end:
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == VARINT:
            _, position = _varint(data, position)
        elif wire == FIXED64:
            position += 8
        elif wire == FIXED32:
            position += 4
        elif wire == LENGTH_DELIMITED:
            length, position = _varint(data, position)
            found.append((field, position, position + length))
            position += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return found


def read_metadata(path: Path) -> dict[str, str]:
    """The ONNX file's metadata_props as a mapping (empty when it has none or is not readable as ONNX)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return metadata(data)
    except (OSError, ValueError):
        return {}


def metadata(data: Any) -> dict[str, str]:
    """A serialised ONNX model's metadata_props (`data`: bytes or a buffer) as a mapping, the last of a repeated
    key winning as it does in onnxruntime; empty when it has none or is not readable as ONNX."""
    try:
        props = {}
        for field, start, end in _fields(data, 0, len(data)):
            if field != METADATA_PROPS_FIELD:
                continue
            entry = {number: bytes(data[a:b]).decode("utf-8") for number, a, b in _fields(data, start, end)}
            props[entry.get(1, "")] = entry.get(2, "")
        return props
    except (ValueError, IndexError, UnicodeDecodeError):
        return {}


def with_metadata(data: bytes, key: str, value: str) -> bytes:
    """A serialised ONNX model with one more metadata_props entry, appended: protobuf reads a repeated field given
    in pieces as one, so the bytes before stay as they are (no parse of a model that may be gigabytes)."""
    entry = _delimited(1, key.encode()) + _delimited(2, value.encode())
    return data + _delimited(METADATA_PROPS_FIELD, entry)


def _delimited(field: int, payload: bytes) -> bytes:
    return _varint_bytes(field << 3 | LENGTH_DELIMITED) + _varint_bytes(len(payload)) + payload


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_settings(path: Path) -> dict[str, Any]:
    """The harness settings stored in an exported ONNX file, or {} for any other ONNX file."""
    text = read_metadata(path).get(METADATA_KEY)
    if not text:
        return {}
    try:
        settings = json.loads(text)
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


def read_labels(path: Path) -> list[str] | None:
    """The class names an exported ONNX file carries in its metadata, or None."""
    labels = read_settings(path).get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ModelError(f"{path} (its metadata): labels must be a list of class names")
    return labels


def settings_text(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)
