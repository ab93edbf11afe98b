"""The exception types every pmod layer raises for bad input.

A `PmodError` message is a single line that names the problem and, where there is
one, the fix. The CLI prints it as ``pmod: error: <message>`` and exits with 2.
"""

import re


class PmodError(Exception):
    """Bad input: a checkpoint, a config value, a shape, a flag."""


class BadSetting(PmodError):
    """A bad value of a named setting, worded by whoever knows what the user typed.

    ``template`` names each setting it mentions as ``{name}`` (its Python argument name,
    e.g. ``"{retention} must be a number > 0"``). ``str()`` gives the Python names, for
    callers of the library; the CLI words it with its flags (``--retention``) through
    :meth:`worded`, so the core never spells a command-line flag.
    """

    def __init__(self, template: str, *settings: str):
        self.template, self.settings = template, settings
        super().__init__(self.worded(lambda name: name))

    def worded(self, spell=lambda name: "--" + name.replace("_", "-")) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: spell(m[1]) if m[1] in self.settings else m[0], self.template)


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message cut to its first line (at most ``limit`` characters), for quoting
    a library's error inside a one-line message; its type name when it has no message."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."
