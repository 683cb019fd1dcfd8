"""Errors a user can cause and fix. The CLI prints them as one line and exits 2."""


class MegamemError(Exception):
    """Base of every user-facing error; the message names the thing and the fix."""


class DataError(MegamemError):
    """Bad input data: a missing file, a corrupt shard, a manifest that does not match."""
