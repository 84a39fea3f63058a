"""User-facing errors: one line saying what and where, exit code 2, no traceback."""


class PreftuneError(Exception):
    """A mistake in the user's input (config, data, paths).

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
