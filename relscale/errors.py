"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class RelscaleError(Exception):
    """A problem the user can fix: bad config, bad path, bad data."""


class ConfigError(RelscaleError):
    """A config key is unknown, has the wrong type, or describes an impossible shape."""


class DataError(RelscaleError):
    """An input or prepared data file is missing, malformed, truncated or corrupted."""
