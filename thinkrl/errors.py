"""The errors a user can cause, at the bottom of the import graph: every module may raise them
without importing the config schema (which imports the registries to validate names)."""


class ConfigError(ValueError):
    """A bad configuration: the message says what to change."""
