"""Errors for problems in the user's input (configs, data, checkpoints).

Scripts catch `SCFeatError` at the top level and print its message without a traceback.
"""


class SCFeatError(Exception):
    """A user-facing error: the message names the file, line or key and what was expected."""
