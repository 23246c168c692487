"""Errors a user can meet, each carrying the exit code `paddlerec.run` returns.

Anything raised as a `UserError` is printed as one line (no traceback) by the entry
point; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1
    prefix = "error"

    def __str__(self):
        return self.args[0] if self.args else ""


class ConfigError(UserError):
    """The YAML config (or an -o override) is invalid. Raised before any work starts."""

    exit_code = 2
    prefix = "config error"

    def __init__(self, key, message):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class DataError(UserError):
    """A data file is missing or malformed; names the file and line when known."""

    exit_code = 2
    prefix = "data error"

    def __init__(self, message, path=None, line=None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class CheckpointError(UserError):
    """A checkpoint cannot be used (missing, incomplete, or of another model shape)."""

    exit_code = 2
    prefix = "checkpoint error"


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""

    exit_code = 1
    prefix = "training error"


class SaveError(UserError):
    """A checkpoint, export, prediction or curve file could not be written (e.g. a full disk)."""

    exit_code = 1
    prefix = "save error"


class PluginError(UserError):
    """The model file or reader file named in the config is broken (says which and where)."""

    exit_code = 2
    prefix = "error"


class DistributedError(UserError):
    """The distributed job failed or could not start; names the worker and its log."""

    exit_code = 1
    prefix = "distributed error"

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


class PeerLost(UserError):
    """A collective or the job's store failed: another worker most likely stopped first."""

    exit_code = 1
    prefix = "distributed error"


class Terminated(UserError):
    """SIGTERM or SIGHUP reached the process; it stopped cleanly."""

    exit_code = 143
    prefix = "error"


def line_prefixes():
    """Every prefix an entry point prints before a UserError's message ("config error", ...),
    longest first: the classes of this module and those other modules derive from them."""
    found, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        found.add(cls.prefix)
        todo.extend(cls.__subclasses__())
    return tuple(sorted(found, key=lambda p: (-len(p), p)))
