"""User-facing errors: one line saying what and where, exit code 2, no traceback."""


class PreftuneError(Exception):
    """A mistake in the user's input (config, data, paths).

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str, where: str | None = None, *, rank_only: bool = False):
        self.where = where
        self.rank_only = rank_only  # under torchrun: this rank's own problem (printed by it, not only by rank 0)
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


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for one-line messages: a 20 MB string, a
    5000-digit number or a YAML alias bomb (a structure of billions of values) must not be built
    into an error message. Bounded in time too: nested containers show their first items only."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"a{' negative' if value < 0 else ''} {value.bit_length()}-bit integer"
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    short.maxlevel = 3
    short.maxlong = 40
    text = short.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."
