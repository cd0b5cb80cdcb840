"""The one error type users see: a clear line saying what is wrong and what to do."""


class CamelidError(Exception):
    """Bad input or a failed operation; the CLI prints the message on one line and exits with code 2."""
