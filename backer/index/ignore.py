"""`.backerignore`: which paths a folder leaves out, in gitignore syntax.

The file sits at the folder root and is synced like any other file, so every replica ignores the
same paths (a per-device ignore set is how Syncthing folders end up "out of sync" forever).
`.backer/` is always ignored, in any case and at any depth. Pure: matching only; the scanner
reads the file.
"""

from __future__ import annotations

import pathspec

from backer.paths import is_reserved

__all__ = ["IGNORE_FILE", "IgnoreRules"]

IGNORE_FILE = ".backerignore"


class IgnoreRules:
    """Compiled ignore patterns; `ignored()` takes NFC folder-relative paths."""

    __slots__ = ("_spec", "text")

    def __init__(self, text: str = "") -> None:
        self.text = text
        lines = text.splitlines()
        self._spec = (
            pathspec.GitIgnoreSpec.from_lines(lines)
            if any(line.strip() and not line.lstrip().startswith("#") for line in lines)
            else None
        )

    def ignored(self, path: str, is_dir: bool) -> bool:
        if any(map(is_reserved, path.split("/"))):  # ours, another share's, or a case variant
            return True
        if self._spec is None:
            return False
        return self._spec.match_file(path + "/" if is_dir else path)
