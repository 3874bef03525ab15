"""The errors a dataset that cannot be used raises: one line naming the file and the key or field."""
from misa_fast.errors import UserError


class DataError(UserError):
    """A dataset that cannot be used as given (missing or malformed keys, fields that contradict
    the data): the message names the file and the key or field."""


class UnsafeDataError(DataError):
    """A dataset whose reading would run code or read other files: refused unread."""
