"""The project's error types for mistakes in what the user gave (options, files, data)."""


class UserError(ValueError):
    """A mistake in what the user gave: reported as one line, exit status 2."""
