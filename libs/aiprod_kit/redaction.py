"""Secrets kept out of what a service says: its log lines, its spans, the errors its callers read.

Two nets, one function (`redact`) that the log processors, the span exporters and the error types all
pass their text through:

- the credentials the process was configured with (every `SecretStr` setting: provider keys and
  tokens, the database URL and its password, the admin key), registered at start-up, are replaced
  wherever they appear, also where a provider's error message quotes them back;
- what a credential looks like is masked even when nobody registered it (a token fetched at run time,
  a key a caller sent): the credential of an HTTP authorization scheme (`Bearer ...`, `Token ...`,
  `Basic ...`), the password of a URL (`scheme://user:PASSWORD@host`), and the signature, credential
  and token query parameters of signed URLs (`X-Goog-Signature=`, `X-Amz-Signature=`, Runway's `_jwt=`).

Values shorter than MIN_SECRET_CHARS are not registered: a one-letter "secret" would blank every log.
"""

import re
import threading
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, SecretStr

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 6

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
# Longest first, so that a secret containing another is replaced whole.
_ordered: tuple[str, ...] = ()

# Each pattern with the text it cannot match without (any of them): most strings (every span attribute
# and log line goes through here) hold none, and a substring test is far cheaper than a regex search.
_PATTERNS = (
    # An authorization scheme and its credential, as headers and client errors quote them.
    (
        ("Bearer", "Token", "Basic"),
        re.compile(r"\b(Bearer|Token|Basic)(\s+|=)([A-Za-z0-9._~+/=:-]{6,})"),
        rf"\1\2{REDACTED}",
    ),
    # A URL's password.
    (
        ("://",),
        re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@\s:'\"]*:)([^/?#@\s'\"]+)@"),
        rf"\1{REDACTED}@",
    ),
    # Signed URLs' signatures, credentials and tokens, and API keys passed as query parameters.
    (
        ("=",),
        re.compile(
            r"([?&;](?:X-(?:Goog|Amz)-(?:Signature|Credential|Security-Token)|Signature|sig|_jwt|jwt|token"
            r"|access_token|api_key|apikey|key|Key-Pair-Id|Policy)=)[^&\s'\"#]+",
            re.IGNORECASE,
        ),
        rf"\1{REDACTED}",
    ),
)


def register_secret(*values: str | SecretStr | None) -> None:
    """Adds credentials to be replaced wherever they appear (empty and short values are ignored)."""
    global _secrets, _ordered
    found = set()
    for value in values:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text and len(text) >= MIN_SECRET_CHARS:
            found.add(text)
    if not found:
        return
    with _lock:
        _secrets = _secrets | found
        _ordered = tuple(sorted(_secrets, key=len, reverse=True))


def register_settings(*settings: BaseModel) -> None:
    """Registers every SecretStr field of the settings (a database URL's password on its own too, so
    that a message quoting it without the rest of the URL is caught)."""
    for model in settings:
        for name in type(model).model_fields:
            value = getattr(model, name, None)
            if isinstance(value, SecretStr):
                register_secret(value, *_url_passwords(value.get_secret_value()))


def _url_passwords(text: str) -> Iterable[str]:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(text).password if "://" in text else None
    except ValueError:
        return ()
    return (password, unquote(password)) if password else ()


def forget_secrets() -> None:
    """Clears the registered credentials (tests)."""
    global _secrets, _ordered
    with _lock:
        _secrets, _ordered = frozenset(), ()


def redact(text: str) -> str:
    """The text with every registered credential and everything shaped like one replaced."""
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for needed, pattern, replacement in _PATTERNS:
        for part in needed:
            if part in text:
                text = pattern.sub(replacement, text)
                break
    return text


def redact_value(value: Any) -> Any:
    """redact() applied to a value's text: a string, or the strings in a list, tuple or dict (other
    values are returned as they are)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(item) for item in value)
    return value


def redact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """redact_value() of each value of a log line's fields. Fields of plain values with
    nothing to redact, most of them, come back as they are after one look at their text joined, rather
    than one look per value (a match in any one value is a match in the joined text)."""
    texts = []
    for value in fields.values():
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict | list | tuple):
            break
    else:
        joined = "\0".join(texts)
        if redact(joined) == joined:
            return fields
    return {key: redact_value(value) for key, value in fields.items()}
