"""Where each config value came from, so an error can name the file or flag to fix."""
from __future__ import annotations

import re

DEFAULT_SOURCE = "default"


class Sources(dict):
    """Maps a dotted key to the file or `--set` flag that last set it."""

    def of(self, key: str) -> str:
        """The source of `key`, or of its nearest recorded ancestor (list items inherit their list's)."""
        key = re.sub(r"\[\d+\]", "", key)
        while key:
            if key in self:
                return self[key]
            key = key.rpartition(".")[0]
        return DEFAULT_SOURCE
