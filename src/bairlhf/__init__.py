"""The foundation both packages import (``bai`` and ``rlhf``); it imports neither.

- ``bairlhf.errors``: ``UserError``, the one exception class for bad input (every CLI turns it
  into one line on stderr and exit code 2).
- ``bairlhf.cli``: the command dispatcher and that error boundary.
- ``bairlhf.typed_config``: the one builder of typed configs from YAML mappings (ranges,
  ``Literal`` enums).
- ``bairlhf.yamlio``: YAML files and values read with errors that name the file and line.
- ``bairlhf.outputs``: output directories a command owns (``--force`` replaces only those) and
  the atomic-write helpers.
- ``bairlhf.progress``: progress that stays quiet in non-TTY logs.

Layering: ``bairlhf`` <- ``bai`` <- ``rlhf`` (checked by ``tests/test_layers.py``).
"""
