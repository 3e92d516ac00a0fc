"""Keep secrets out of output: masked config dumps and a logging filter."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

MASK = "***"

# Keys whose values are secrets wherever they appear in a config.
_SECRET_KEY = re.compile(r"(pass(word)?|secret|token|private|_key$|^key$|sasl_plain|psk)", re.I)


def is_secret_key(key: str) -> bool:
    """True for config keys that hold secrets (``password``, ``wifi_password``, ``key`` ...)."""
    return bool(_SECRET_KEY.search(key)) and not key.endswith(("_env", "_file", "_path"))


def mask(config: Any) -> Any:
    """A copy of ``config`` (dicts, lists, dataclass-like values) with secret values masked."""
    if isinstance(config, dict):
        return {k: (MASK if is_secret_key(str(k)) and v not in ("", None) else mask(v))
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(mask(v) for v in config)
    return config


class SecretFilter(logging.Filter):
    """Replaces known secret values in every log record passing through it.

    Masking by key catches structured dumps; this catches a secret that reaches a message by
    any other path (an exception text, a URL with credentials).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        for s in secrets:
            self.add(s)

    def add(self, secret: str | None) -> None:
        """Register one more value to mask (values shorter than 4 characters are ignored)."""
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        """``text`` with every registered secret replaced by the mask."""
        for s in self._secrets:
            if s in text:
                text = text.replace(s, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            record.msg = self.scrub(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def install(secrets: Iterable[str], logger: logging.Logger | None = None) -> SecretFilter:
    """Attach a :class:`SecretFilter` to every handler of ``logger`` (default: the root)."""
    flt = SecretFilter(secrets)
    target = logger or logging.getLogger()
    for handler in target.handlers:
        handler.addFilter(flt)
    target.addFilter(flt)
    return flt
