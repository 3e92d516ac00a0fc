"""Exceptions shared by every part of Tern."""


class TernError(Exception):
    """Base class of Tern's own errors."""


class CodecError(TernError, ValueError):
    """A payload, envelope or topic does not follow the contract in docs/contracts.md."""


class ConfigError(TernError, ValueError):
    """A configuration value is missing or wrong; the message says which and why."""


class ToolMissing(TernError, RuntimeError):
    """A part of the toolchain is not installed; the message says how to get it."""
