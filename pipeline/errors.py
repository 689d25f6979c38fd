"""Errors that reach users as one clear line (the CLI prints them without a traceback; HTTP maps them)."""


class UserError(ValueError):
    """Bad input or state the user can fix; the message says what is wrong and, where possible, how."""


class DataError(UserError):
    """Input data that cannot be used: wrong dimension, NaN vectors, unreadable files."""


class NotFound(UserError):
    """A named item, file, version or shard does not exist."""


class IntegrityError(UserError):
    """A stored file does not match its manifest checksum (corrupt or tampered)."""
