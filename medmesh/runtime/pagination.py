"""Opaque AIP-158 page tokens: keyset pagination bound to the query that produced them.

Tokens are not signed: the cursor only says where to resume in a result the caller may
read anyway (tenancy is a server-side condition of the query, not part of the token),
so a hand-made token can skip ahead but never reveal more.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass

from medmesh.runtime.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class PageRequest:
    size: int
    after: str | None  # sort key of the last item already returned


def _fingerprint(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def encode_token(after: str, query: str) -> str:
    raw = json.dumps({"a": after, "q": _fingerprint(query)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_request(page_size: int, page_token: str, query: str) -> PageRequest:
    """Decodes a request's paging fields; a token from another query or garbage is INVALID_ARGUMENT."""
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return PageRequest(size=size, after=None)
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, fingerprint = data["a"], data["q"]
        if not isinstance(after, str) or not isinstance(fingerprint, str):
            raise ValueError("malformed")
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidArgument.for_field(
            "page_token", "is not a token this service issued", reason="INVALID_PAGE_TOKEN"
        ) from error
    if fingerprint != _fingerprint(query):
        raise InvalidArgument.for_field("page_token", "was issued for a different filter", reason="INVALID_PAGE_TOKEN")
    return PageRequest(size=size, after=after)
