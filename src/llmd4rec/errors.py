"""One error type for anything a user handed in, so the CLI can print one line and exit 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a file, a line, a config key. The message is the whole story."""

    def __init__(self, problem: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + problem)
        self.path = path
        self.line = line
