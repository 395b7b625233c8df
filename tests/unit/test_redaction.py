"""aiprod_kit.redaction: the credentials a process was configured with, and what looks like one, are
masked in any text (issue 13 item 6; tests/mesh/test_secrets.py holds the mesh to it)."""

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from aiprod_kit.redaction import (
    _PATTERNS,
    REDACTED,
    forget_secrets,
    redact,
    redact_fields,
    redact_value,
    register_secret,
    register_settings,
)
from aiprod_kit.telemetry import redacted_span


@pytest.fixture(autouse=True)
def no_registered_secrets() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


def test_a_registered_secret_is_replaced_wherever_it_appears():
    register_secret("key_0123456789abcdef")
    text = "refused: {'error': 'bad key key_0123456789abcdef', 'echo': \"key_0123456789abcdef\"}"
    assert redact(text) == f"refused: {{'error': 'bad key {REDACTED}', 'echo': \"{REDACTED}\"}}"


def test_short_and_empty_values_are_not_registered():
    register_secret("", None, "abc", SecretStr(""))
    assert redact("abc and more") == "abc and more"


def test_a_secret_containing_another_is_replaced_whole():
    register_secret("secret-part", "secret-part-and-more")
    assert redact("x secret-part-and-more y") == f"x {REDACTED} y"


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("invalid credentials: 'Bearer ya29.a0AfB_byC-xyz'", "Bearer", "ya29.a0AfB_byC-xyz"),
        ("Authorization: Token r8_AbCdEf123456", "Token", "r8_AbCdEf123456"),
        ("authorization=Basic dXNlcjpwYXNzd29yZA==", "Basic", "dXNlcjpwYXNzd29yZA=="),
        ("postgresql://aiprod:pg-s3cret@db:5432/aiprod", "postgresql://aiprod:", "pg-s3cret"),
        (
            "https://storage.googleapis.com/b/o.png?X-Goog-Algorithm=GOOG4&X-Goog-Signature=abc123def",
            "X-Goog-Algorithm=GOOG4",
            "abc123def",
        ),
        ("https://cdn.runway.example/v.mp4?_jwt=eyJhbGciOi.eyJzdWIi.sig", "v.mp4?_jwt=", "eyJhbGciOi"),
        ("https://s3.example/o?X-Amz-Credential=AKIA123%2F&X-Amz-Signature=f00d", "X-Amz", "AKIA123"),
    ],
)
def test_what_looks_like_a_credential_is_masked_unregistered(text, kept, gone):
    redacted = redact(text)
    assert gone not in redacted
    assert kept in redacted and REDACTED in redacted


def test_ordinary_text_is_left_alone():
    text = "job job_0123 failed at runway: the task failed (HTTP 400); page_token=5&size=3"
    assert redact(text) == text


def test_settings_register_their_secret_fields_and_a_database_urls_password():
    class Settings(BaseSettings):
        api_secret: SecretStr = SecretStr("provider-secret-1")
        database_url: SecretStr = SecretStr("postgresql://user:pa%40ss-word@db/x")
        model: str = "gen4.5"

    register_settings(Settings())
    assert redact("provider-secret-1") == REDACTED
    # The password alone, as a driver's message might quote it, raw or decoded.
    assert redact("password 'pa@ss-word' refused") == f"password '{REDACTED}' refused"
    assert redact("model gen4.5") == "model gen4.5"


def test_values_in_structures_are_redacted_and_others_kept():
    register_secret("secret-token-1")
    value = {"a": ["x secret-token-1", 3], "b": ("secret-token-1",), "c": 1.5}
    assert redact_value(value) == {"a": [f"x {REDACTED}", 3], "b": (REDACTED,), "c": 1.5}


# Pieces of credentials and of the text around them: the patterns' words, separators and characters.
_PIECES = st.sampled_from(
    [
        "Bearer",
        "Token",
        "Basic",
        " ",
        "=",
        ":",
        "//",
        "://",
        "@",
        "?",
        "&",
        ";",
        "sig",
        "_jwt",
        "key",
        "X-Goog-Signature",
        "https",
        "user",
        "pw",
        "abcdef123",
        "/",
        "#",
        "'",
        "\n",
        "bearer",
        "TOKEN",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join))
def test_the_patterns_skipped_for_text_without_their_marks_would_have_changed_nothing(text):
    """redact runs a pattern only on text holding a substring that pattern needs (a speed-up: most text
    holds none): the same result as every pattern run on every text."""
    expected = text
    for _, pattern, replacement in _PATTERNS:
        expected = pattern.sub(replacement, expected)
    assert redact(text) == expected


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["event", "job_id", "url", "error", "count", "items"]),
        st.one_of(
            st.lists(_PIECES, max_size=8).map("".join),
            st.integers(),
            st.lists(st.lists(_PIECES, max_size=4).map("".join), max_size=2),
        ),
        max_size=5,
    )
)
def test_a_lines_fields_are_redacted_as_each_value_would_be(fields):
    """redact_fields looks at the fields' text joined and gives them back as they are when that has
    nothing to redact (a speed-up: most log lines): the same result as every value redacted."""
    register_secret("key_0123456789abcdef")
    fields = {**fields, "echo": "sent key_0123456789abcdef"} if "url" in fields else fields
    expected = {key: redact_value(value) for key, value in fields.items()}
    assert redact_fields(fields) == expected


def test_fields_with_nothing_to_redact_come_back_as_they_are():
    fields = {"event": "job created", "job_id": "job_1", "price_micros": 480000}
    assert redact_fields(fields) is fields
    # Any one value with a credential in it is enough for every value to be redacted one by one.
    register_secret("key_0123456789abcdef")
    leaky = {**fields, "error": "bad key key_0123456789abcdef"}
    assert redact_fields(leaky) == {**fields, "error": f"bad key {REDACTED}"}


def test_an_exported_span_is_redacted_in_its_attributes_events_and_status():
    register_secret("key_0123456789abcdef")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call", attributes={"rpc.method": "Create", "n": 3}) as span:
        clean = span
    assert redacted_span(clean) is clean  # nothing to redact: exported as it is
    with tracer.start_as_current_span("call", attributes={"url": "key_0123456789abcdef", "n": 3}) as span:
        span.add_event("refused", {"body": "bad key key_0123456789abcdef"})
        span.add_event("retried", {"attempt": 2})
        span.set_status(Status(StatusCode.ERROR, "key_0123456789abcdef refused"))
        dirty = span
    redacted = redacted_span(dirty)
    assert dict(redacted.attributes) == {"url": REDACTED, "n": 3}
    assert [(event.name, dict(event.attributes)) for event in redacted.events] == [
        ("refused", {"body": f"bad key {REDACTED}"}),
        ("retried", {"attempt": 2}),
    ]
    assert redacted.status.description == f"{REDACTED} refused"
    assert redacted.context == dirty.context
