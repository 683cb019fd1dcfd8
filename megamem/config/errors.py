"""The one exception a user's configuration mistake raises."""


class ConfigError(ValueError):
    """A config problem. Its message names the file or flag, the key and the fix;
    the command-line entry point prints it alone and exits with status 2."""
