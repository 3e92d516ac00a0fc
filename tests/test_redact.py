"""Secrets stay out of config dumps and log lines."""

from __future__ import annotations

import logging

from tern.security.redact import MASK, SecretFilter, is_secret_key, mask


def test_mask_hides_secret_values_at_any_depth() -> None:
    config = {"device": "n1", "wifi": {"ssid": "farm", "password": "hunter22"},
              "mqtt_password": "pw-123456", "password_env": "TERN_PW", "tls": [{"key": "k-abc"}]}
    masked = mask(config)
    assert masked["wifi"] == {"ssid": "farm", "password": MASK}
    assert masked["mqtt_password"] == MASK and masked["tls"][0]["key"] == MASK
    assert masked["password_env"] == "TERN_PW"  # names where a secret lives are not secrets
    assert config["wifi"]["password"] == "hunter22"  # the original is untouched
    assert is_secret_key("sasl_plain_password") and not is_secret_key("keepalive")


def test_filter_scrubs_messages_args_and_tracebacks(caplog) -> None:
    log = logging.getLogger("tern.test.redact")
    flt = SecretFilter(["s3cret-value"])
    log.addFilter(flt)
    try:
        with caplog.at_level(logging.DEBUG, logger="tern.test.redact"):
            log.debug("connecting with %s", "s3cret-value")
            try:
                raise ValueError("bad password s3cret-value")
            except ValueError:
                log.exception("failed")
    finally:
        log.removeFilter(flt)
    text = caplog.text
    assert "s3cret-value" not in text
    assert text.count(MASK) >= 2 and "ValueError" in text
