"""The one error type for bad input: `darp` prints its message as one line (exit status 1), no traceback."""


class DataError(ValueError):
    """Bad input data or a refused output; the message names the file and the problem."""
