"""Where the cluster is and how to prove we may use it.

The Jobs API address comes from `--address`, else `RAY_API_SERVER_ADDRESS`, else
`RAY_ADDRESS` (Ray's own order). Ray 2.60 clusters usually require a token; Ray's SDK only
sends one when `RAY_AUTH_MODE=token` is set in the *client's* environment, which users
forget, so raykd looks the token up itself, in Ray's order: `RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`, and sends it as a bearer header.
`RAY_AUTH_MODE=disabled` keeps raykd from sending any token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from raykd.errors import UserError

ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@dataclass(frozen=True)
class Address:
    url: str  # http(s)://host:port, no trailing slash
    source: str  # where it came from, for error messages: "--address" or an env var

    @property
    def where(self) -> str:
        return self.url if self.source == "--address" else f"{self.url} (from {self.source})"


def resolve_address(given: str | None) -> Address:
    """The Jobs API URL: an explicit --address wins, then Ray's environment variables."""
    source = "--address"
    value = given
    if not value:
        for var in ADDRESS_VARS:
            if os.environ.get(var):
                value, source = os.environ[var], var
                break
    if not value:
        raise UserError("--address: no cluster given; pass --address http://HEAD:8265 or set "
                        "RAY_ADDRESS to the cluster's dashboard URL")
    if value == "auto" or value.startswith("ray://"):
        raise UserError(f"{source}: {value} is not a Jobs API address; use the dashboard URL "
                        "of the head node, e.g. http://HEAD:8265")
    if "://" not in value:
        value = f"http://{value}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{source}: {value} is not an http(s)://HOST:PORT address")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UserError(f"{source}: {value} has an invalid port") from None
    return Address(url=value.rstrip("/"), source=source)


@dataclass(frozen=True)
class Token:
    value: str | None
    source: str  # "RAY_AUTH_TOKEN", a file path, or why there is none

    def headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self.value}"} if self.value else None


def find_token() -> Token:
    """The token to send, looked up in Ray's order; Token(None, why) when there is none."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return Token(None, "RAY_AUTH_MODE=disabled")
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Token(_read_token(Path(path).expanduser(), "RAY_AUTH_TOKEN_PATH"),
                     f"RAY_AUTH_TOKEN_PATH={path}")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return Token(_read_token(default, str(default)), str(default))
    return Token(None, "no token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


def _read_token(path: Path, label: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise UserError(f"{label}: cannot read token file {path}: {e.strerror}") from None
    if not value:
        raise UserError(f"{label}: token file {path} is empty")
    return value


def refused(address: Address, token: Token, message: str) -> UserError:
    """A one-line error for a 401/403 from the cluster (`message` is Ray's
    AuthenticationError text: 'Authentication required' for 401, '... failed' for 403)."""
    if message.startswith("Authentication required"):
        hint = (" (RAY_AUTH_MODE=disabled keeps raykd from sending one)"
                if token.source == "RAY_AUTH_MODE=disabled" else "")
        return UserError(f"{address.where}: the cluster requires a Ray auth token and none was "
                         f"sent{hint}; set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the "
                         "cluster's token in ~/.ray/auth_token")
    return UserError(f"{address.where}: the cluster refused the auth token from {token.source}; "
                     "it is not this cluster's token")
