"""Errors that stop a run with a message for the user (the CLI prints them without a traceback)."""


class RunStopped(RuntimeError):
    """The run cannot go on (non-finite loss, a failed write, a lost process); the message says
    why, where, and which checkpoint to resume from."""
