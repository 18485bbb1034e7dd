"""The domain errors of phishgate.

Library code raises these; each edge (gRPC transport, SMTP front-end, CLI) maps them to its
own status codes or replies in one place. Messages are safe to show to a caller: they name
the problem, never internal paths or stack traces.
"""

from __future__ import annotations


class PhishgateError(Exception):
    """Base of every error phishgate raises on purpose."""


class InvalidMessage(PhishgateError):
    """The input is not an email that can be rendered (empty, binary, over a limit...)."""


class AdapterNotFound(PhishgateError):
    """A logical adapter name that is not configured or not loaded."""


class AdapterMismatch(PhishgateError):
    """An adapter built for another base model or prompt version."""


class EngineUnavailable(PhishgateError):
    """The scoring engine is not loaded, shutting down, or failed."""


class EngineOverloaded(PhishgateError):
    """The scoring engine's queue is full; the caller should retry later."""


class ConfigError(PhishgateError):
    """A configuration file or setting that cannot be used as given."""


class ModelNotPrepared(PhishgateError):
    """The base model is not in the local cache; run `phishgate model prepare`."""
