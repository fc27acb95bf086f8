"""The one exception class for bad input.

Every module's own error class (``ConfigError``, ``MergeError``, ``SweepError``,
``PlacementError``, ...) derives from ``UserError``; the CLI boundary (``bairlhf.cli``) prints
its message as one line and exits with code 2. A message names the key, the file (with its line
where there is one) or the tensor at fault. Anything that is not a ``UserError`` is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a config key, a file or a tensor; the message names it."""
