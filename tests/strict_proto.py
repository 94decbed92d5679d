"""kubectl's typed commands (``kubectl create namespace|secret|configmap``) send protobuf
(``application/vnd.kubernetes.protobuf``); the emulator stores JSON. This decodes the few
kinds those commands create: the ``k8s\\0`` envelope (runtime.Unknown), ObjectMeta's name,
generateName, namespace, labels and annotations, and the data of Secrets and ConfigMaps.
Field numbers are those of k8s.io/api's generated.proto."""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> list[tuple[int, Any]]:
    """The (field number, value) pairs of one message: varints as ints, length-delimited as
    bytes (nested messages are decoded by the caller, which knows the schema)."""
    out: list[tuple[int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            out.append((num, v))
        elif wire == 2:
            n, i = _varint(buf, i)
            out.append((num, buf[i : i + n]))
            i += n
        elif wire == 1:
            out.append((num, buf[i : i + 8]))
            i += 8
        elif wire == 5:
            out.append((num, buf[i : i + 4]))
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return out


def _map(entries: list[bytes], text: bool = True) -> dict[str, Any]:
    out = {}
    for e in entries:
        kv = dict(fields(e))
        value = kv.get(2, b"")
        out[kv.get(1, b"").decode()] = (
            value.decode() if text else base64.b64encode(value).decode()
        )
    return out


def _meta(buf: bytes) -> dict[str, Any]:
    fs = fields(buf)
    names = {1: "name", 2: "generateName", 3: "namespace"}
    meta: dict[str, Any] = {names[n]: v.decode() for n, v in fs if n in names and v}
    for num, key in ((11, "labels"), (12, "annotations")):
        entries = [v for n, v in fs if n == num]
        if entries:
            meta[key] = _map(entries)
    return meta


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded Namespace, Secret or ConfigMap."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf body")
    unknown = dict(fields(body[len(MAGIC) :]))
    tm = dict(fields(unknown.get(1, b"")))
    api_version, kind = tm.get(1, b"").decode(), tm.get(2, b"").decode()
    fs = fields(unknown.get(2, b""))
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    for num, value in fs:
        if num == 1:
            obj["metadata"] = _meta(value)
    if kind == "Secret":
        data = _map([v for n, v in fs if n == 2], text=False)
        string_data = _map([v for n, v in fs if n == 4])
        obj.update({"data": data} if data else {})
        obj.update({"stringData": string_data} if string_data else {})
        types = [v.decode() for n, v in fs if n == 3]
        obj.update({"type": types[-1]} if types else {})
    elif kind == "ConfigMap":
        data = _map([v for n, v in fs if n == 2])
        obj.update({"data": data} if data else {})
    elif kind != "Namespace":
        raise ValueError(f"protobuf body of kind {kind!r} is not decoded here")
    return obj
