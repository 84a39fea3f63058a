"""User-facing errors: one line saying what and where, exit code 2, no traceback."""


class PreftuneError(Exception):
    """A mistake in the user's input (config, data, paths).

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class RunStopped(Exception):
    """A signal (SIGTERM: a cluster's preemption, SIGINT: Ctrl-C) stopped training after a finished
    optimizer step whose checkpoint is written. The CLI prints the message and exits 128 + signal."""

    def __init__(self, signal_name: str, signal_number: int, step: int):
        self.signal_name, self.step = signal_name, step
        self.exit_code = 128 + signal_number
        super().__init__(f"stopped by {signal_name} at step {step}; resume with resume_from_checkpoint=true")


class TrainingDiverged(PreftuneError):
    """The loss became NaN or infinite: the logs and summary of the steps before it are written, the
    last checkpoint is kept, no final/ of broken weights is saved. The CLI prints one line, exit 1."""

    exit_code = 1
