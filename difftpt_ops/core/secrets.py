"""Secrets never printed: URL passwords masked in messages and in every log record."""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://user:password@ (user may be empty, as in redis://:password@host).
_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<tail>@)")
# libpq's key=value form (`password=secret`), which drivers echo in some connection errors.
_PASSWORD_PARAMETER = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'[^']*'|[^\s&;]+)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Replace the password of every `scheme://user:password@host` in `url` (or in a message) with ***."""
    masked = _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***{m['tail']}", url)
    return _PASSWORD_PARAMETER.sub(lambda m: f"{m['head']}***", masked)


_masking_installed = False


def install_secret_masking() -> None:
    """Mask URL passwords in every log record this process creates (message and traceback), for any handler.

    Called once by each entry point (the CLI, the Celery worker); libraries log URLs in their errors.
    """
    global _masking_installed
    if _masking_installed:
        return
    _masking_installed = True
    make_record = logging.getLogRecordFactory()

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: leave it for logging to report
            return record
        record.msg, record.args = mask_url(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_url(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(masked_record)
