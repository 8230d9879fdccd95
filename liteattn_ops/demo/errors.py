"""The demo's one exception type."""


class DemoError(Exception):
    """Bad input or an unusable environment: printed as one line, exit status 2."""
