"""The exception a user's configuration mistake raises."""
from megamem.errors import MegamemError


class ConfigError(MegamemError, ValueError):
    """A config problem. Its message names the file or flag, the key and the fix."""
