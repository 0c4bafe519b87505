"""`medmesh login` / `medmesh token` / `medmesh logout`: a developer's bearer token for curl.

The session (access and refresh token) is kept in the state directory, mode 0600. `token`
refreshes it when the access token is about to expire, and logs in with the first platform
admin's credentials (written by `medmesh up`) when there is no session yet.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from medmesh.launcher.config import PlatformConfig

# Refresh a little before expiry, so a token printed for curl is still good when curl sends it.
EXPIRY_MARGIN_SECONDS = 30


class SessionError(Exception):
    """Login, refresh or logout was refused; the message says why."""


@dataclass(frozen=True)
class Session:
    username: str
    access_token: str
    access_expires_at: float
    refresh_token: str

    @property
    def fresh(self) -> bool:
        return time.time() < self.access_expires_at - EXPIRY_MARGIN_SECONDS


def session_file(config: PlatformConfig) -> Path:
    return config.state_dir / "session.json"


def _client(config: PlatformConfig) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(config.tls_dir / "ca.crt"))
    return httpx.Client(base_url=f"https://localhost:{config.port('gateway')}", verify=context, timeout=15.0)


def _post(config: PlatformConfig, path: str, body: dict[str, object]) -> dict[str, object]:
    try:
        with _client(config) as client:
            reply = client.post(path, json=body)
    except httpx.HTTPError as error:
        raise SessionError(f"cannot reach the gateway: {error} (is the platform up?)") from error
    data: dict[str, object] = reply.json() if reply.content else {}
    if reply.status_code != 200:
        raise SessionError(f"{path}: HTTP {reply.status_code}: {data.get('message', reply.text)}")
    return data


def _save(config: PlatformConfig, username: str, reply: dict[str, object]) -> Session:
    session = Session(
        username=username,
        access_token=str(reply["access_token"]),
        access_expires_at=time.time() + float(str(reply.get("expires_in", 0))),
        refresh_token=str(reply.get("refresh_token", "")),
    )
    path = session_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(asdict(session)))
    return session


def load(config: PlatformConfig) -> Session | None:
    path = session_file(config)
    if not path.exists():
        return None
    return Session(**json.loads(path.read_text()))


def login(config: PlatformConfig, username: str | None = None, password: str | None = None) -> Session:
    """Logs in; without a username, as the first platform admin of this state directory."""
    if username is None:
        admin = config.admin_credentials()
        username, password = admin.username, admin.password
    reply = _post(config, "/v1/auth:login", {"password": {"username": username, "password": password or ""}})
    return _save(config, username, reply)


def token(config: PlatformConfig) -> str:
    """A valid access token: the saved one, refreshed, or from a new login as the admin."""
    session = load(config)
    if session is not None and session.fresh:
        return session.access_token
    if session is not None and session.refresh_token:
        try:
            reply = _post(config, "/v1/auth:refresh", {"refresh_token": session.refresh_token})
            return _save(config, session.username, reply).access_token
        except SessionError:
            pass  # expired or revoked refresh token: log in again below
    if session is not None and session.username != config.admin_credentials().username:
        raise SessionError(f"the session of {session.username} has expired; run `medmesh login` again")
    return login(config).access_token


def logout(config: PlatformConfig) -> None:
    session = load(config)
    if session is None:
        return
    if session.refresh_token:
        _post(config, "/v1/auth:logout", {"refresh_token": session.refresh_token})
    session_file(config).unlink()
