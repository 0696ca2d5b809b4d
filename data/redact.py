"""Hide credentials in shard URLs and commands before they are logged or written where others read.

Shard specs may carry secrets: ``https://user:TOKEN@host/...``, ``?token=...``,
``&X-Amz-Signature=...``, ``pipe:curl -H "Authorization: Bearer ..." ...``, ``pipe:env
API_KEY=... cmd``. ``redact`` replaces each secret with ``***`` and leaves everything else (plain
paths, bucket names, brace patterns, the command itself) as it was, so a logged spec still says
which data a run read. It lives in ``data`` because shard specs are data's; ``eval.tracking``
applies it to every MLflow param and ``pretrain.export`` to an export's provenance.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"

# a name that says its value is a secret (query parameters, headers, variables, options)
_SECRET_NAME = r"[\w-]*(?:token|secret|passw(?:or)?d|pwd|signature|sig|credential|api[_-]?key|access[_-]?key|auth\w*|key)[\w-]*"

_RULES: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host -> scheme://user:***@host; scheme://token@host -> scheme://***@host
    (re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@'\"]+):(?P<secret>[^/\s@'\"]+)@"),
     rf"\g<pre>\g<user>:{MASK}@"),
    (re.compile(r"(?P<pre>\bhttps?://)(?P<secret>[^/\s:@'\"]+)@"), rf"\g<pre>{MASK}@"),
    # ?token=...&X-Amz-Signature=...  (query parameters named like secrets)
    (re.compile(rf"(?P<pre>[?&;](?i:{_SECRET_NAME})=)(?P<secret>[^&#\s'\"]+)"), rf"\g<pre>{MASK}"),
    # "Authorization: Bearer ...", "X-Api-Key: ...", "PRIVATE-TOKEN: ..." (headers in a pipe: command)
    (re.compile(rf"(?P<pre>(?i:{_SECRET_NAME})\s*:\s*(?:(?i:bearer|basic|token)\s+)?)(?P<secret>(?!\*{{3}})[^\s'\"]+)"),
     rf"\g<pre>{MASK}"),
    # API_KEY=... cmd, --token=..., --password ...  (variables and options of a pipe: command)
    (re.compile(rf"(?P<pre>(?:^|[\s:;'\"])(?:--?)?(?i:{_SECRET_NAME})(?:=|\s+))(?P<secret>[^\s'\"-][^\s'\"]*)"),
     rf"\g<pre>{MASK}"),
    # curl -u user:password / --user user:password
    (re.compile(r"(?P<pre>(?:^|\s)(?:-u|--user)\s+(?:['\"])?[^\s:'\"]+:)(?P<secret>[^\s'\"]+)"), rf"\g<pre>{MASK}"),
    # bare AWS access key ids and JSON web tokens, wherever they appear
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (re.compile(r"\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]+"), MASK),
]


def redact_text(text: str) -> str:
    """`text` with every credential replaced by ``***``; text without one comes back unchanged."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any) -> Any:
    """A value safe to log: strings via redact_text, dicts, lists and tuples element by element,
    anything else (numbers, None, booleans) unchanged."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
