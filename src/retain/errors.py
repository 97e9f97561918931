"""One error type for everything a user can get wrong: the CLI prints it and exits 2."""


class RetainError(Exception):
    """A problem with the user's input (config, data, model, run directory)."""
