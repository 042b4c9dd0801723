"""The one error type for bad input a user can fix, and how every command line reports it.

Messages are one line, `<what> in <where>: <how to fix>`; the CLIs print `<prog>: error: <message>` and exit
with status 2, the Python API raises InputError (a ValueError) with the same message.
"""
import sys

INPUT_ERROR_STATUS = 2


class InputError(ValueError):
    """Bad input, found before work was done where possible. Give (what, where, fix), or one whole message."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(what if where is None else f"{what} in {where}: {fix}")


class UsageError(InputError):
    """A bad command-line value or combination; the CLIs print the message and exit with status 2."""


def one_line(message) -> str:
    """`message` with its line breaks folded into spaces (an error must fit one line)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def describe(error) -> str:
    """One line for an error: InputError's own message; an OSError's reason and path; else its message."""
    if isinstance(error, OSError) and not isinstance(error, InputError) and error.filename:
        return (f"{error.strerror or type(error).__name__} in {error.filename}: check that the path exists and "
                f"that you may read and write it")
    return one_line(error)


def report(prog: str, error, status: int = INPUT_ERROR_STATUS) -> int:
    """Print `<prog>: error: <message>` on stderr; the exit status to return."""
    print(f"{prog}: error: {describe(error)}", file=sys.stderr)
    return status
