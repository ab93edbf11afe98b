"""The one exception type every pmod layer raises for bad input.

A `PmodError` message is a single line that names the problem and, where there is
one, the fix. The CLI prints it as ``pmod: error: <message>`` and exits with 2.
"""


class PmodError(Exception):
    """Bad input: a checkpoint, a config value, a shape, a flag."""
