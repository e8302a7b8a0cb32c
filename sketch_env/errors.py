"""The errors `darp` reports as one line (exit status 1), no traceback.

Library code raises them; only the command line (`tune_runs.cli.main`) turns them into exit codes.
"""


class DataError(ValueError):
    """Bad input data or a refused output; the message names the file and the problem."""


class ConfigError(DataError):
    """An option value that cannot work (wrong type, out of range); the message names the option."""


class RunStopped(RuntimeError):
    """A training run that failed or was interrupted; the message says where it stands and how to resume."""
