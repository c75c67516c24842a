"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class CrowdsegError(Exception):
    """A problem with the user's input (config, file, path) rather than a bug."""


class ConfigError(CrowdsegError):
    """An invalid experiment configuration: unknown key, wrong type, missing value or file."""


class DataError(CrowdsegError):
    """An invalid dataset file or annotation; the message names the file (and line or key)."""
