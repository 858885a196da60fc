"""The one exception type of the data tools: bad input files, bad flags, corrupt datasets."""


class DataError(Exception):
    """A problem with the user's data or options. The message says what, where (file:line) and how to fix it."""
