"""User-facing errors.

Every problem a user can cause (bad path, bad spec, unsupported model, ...) raises a
:class:`BitsmithError` whose message is one line naming the problem and the fix. The CLI prints
it without a traceback; anything else escaping is a bug in bitsmith.
"""


class BitsmithError(Exception):
    """A problem with the user's input, reported as one line."""


class SpecError(BitsmithError, ValueError):
    """An invalid quantization spec or recipe field."""
