"""Moving a file's bytes to object storage through pre-signed URLs (protocol 3.5 and 4.5)."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import httpx

from medmesh_device.errors import UploadError
from medmesh_device.protocol import FileResponse

FileSource = bytes | str | Path
_READ_CHUNK = 1024 * 1024


def _digest_path(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while block := stream.read(_READ_CHUNK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


async def size_and_sha256(source: FileSource) -> tuple[int, str]:
    """Size in bytes and SHA-256 (hex) of what will be uploaded; files are read off the event loop."""
    if isinstance(source, bytes):
        return len(source), hashlib.sha256(source).hexdigest()
    return await asyncio.to_thread(_digest_path, Path(source))


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as stream:
        stream.seek(offset)
        return stream.read(length)


async def read_range(source: FileSource, offset: int, length: int) -> bytes:
    if isinstance(source, bytes):
        return source[offset : offset + length]
    return await asyncio.to_thread(_read_range, Path(source), offset, length)


def https_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Trusts `ca_file` (the platform CA for a local platform) or the system's roots."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


async def _put(http: httpx.AsyncClient, url: str, body: bytes, content_type: str, file: str) -> httpx.Response:
    try:
        reply = await http.put(url, content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError as error:
        raise UploadError("UPLOAD_FAILED", f"PUT to object storage: {error}", file) from error
    if not reply.is_success:
        answer = f"object storage answered HTTP {reply.status_code}: {reply.text[:300]}"
        raise UploadError("UPLOAD_FAILED", answer, file)
    return reply


async def put_bytes(
    http: httpx.AsyncClient, answer: FileResponse, source: FileSource, size: int, content_type: str
) -> list[tuple[int, str]]:
    """PUTs the bytes to the single URL or part by part; the (part number, ETag) list for `complete`."""
    if answer.single_url:
        await _put(http, answer.single_url, await read_range(source, 0, size), content_type, answer.file)
        return []
    if not answer.parts or answer.part_size <= 0:
        raise UploadError("INVALID_RESPONSE", "the upload answer has neither a single URL nor parts", answer.file)
    etags = []
    for part in answer.parts:
        body = await read_range(source, (part.part_number - 1) * answer.part_size, answer.part_size)
        reply = await _put(http, part.url, body, content_type, answer.file)
        etag = reply.headers.get("ETag")
        if not etag:
            raise UploadError("UPLOAD_FAILED", f"part {part.part_number}: no ETag in the storage's answer", answer.file)
        etags.append((part.part_number, etag))
    return etags
