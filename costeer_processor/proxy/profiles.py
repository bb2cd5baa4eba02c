"""The local profile store: one text file per profile, read fresh on every request, never served back.

A profile is ``DIR/<name>.txt`` (UTF-8). A request picks one with the ``X-CoSteer-Profile`` header
or the OpenAI ``user`` field (the header wins); without either, the store's default profile
(``--default-profile NAME``, else ``DIR/default.txt`` when it exists) applies. The file is read
at each request, so an edit applies to the next request; its text goes to the small model on
this device only. No route returns a profile's text: :meth:`ProfileStore.names` is the only
listing, and error messages name the profile, never its content.

Example::

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "alice.txt").write_text("I am vegan and I love spicy food.", encoding="utf-8")
    >>> store = ProfileStore(root, default="alice")
    >>> store.names()
    ['alice']
    >>> store.context(None, None)[0]  # the default profile
    'alice'
    >>> store.context("bob", None)
    Traceback (most recent call last):
    ...
    costeer_processor.proxy.profiles.UnknownProfileError: unknown profile 'bob' (known: alice)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

__all__ = ["ProfileStore", "UnknownProfileError", "ProfileError", "PROFILE_HEADER", "SUFFIX"]

PROFILE_HEADER = "X-CoSteer-Profile"
SUFFIX = ".txt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
MAX_PROFILE_BYTES = 4 << 20  # far above any small model's window; the runner's budget is the real limit


class ProfileError(ValueError):
    """A profile exists but cannot be used (unreadable, empty, too big, not UTF-8): HTTP 400."""


class UnknownProfileError(LookupError):
    """No profile of that name (HTTP 404, naming it)."""

    def __init__(self, name: str, known: list[str]):
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        super().__init__(f"unknown profile {name!r} (known: {shown or 'none'})")
        self.name = name

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]


class ProfileStore:
    """Profiles in ``root`` (``None``: no store; only inline contexts then).

    Args:
        root: the folder holding ``<name>.txt`` files.
        default: the profile used when a request names none (default: ``default`` when
            ``root/default.txt`` exists at request time).
    """

    def __init__(self, root: Optional[Union[str, Path]], default: Optional[str] = None):
        self.root = None if root is None else Path(root).expanduser()
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"--profiles {self.root}: not a folder")
        if default is not None and not _NAME.match(default):
            raise ValueError(f"--default-profile {default!r}: a profile name is letters, digits and _.@+- "
                             "(at most 128 characters)")
        self.default = default

    def names(self) -> list[str]:
        """The profile names (never their text)."""
        if self.root is None:
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.glob("*" + SUFFIX)
                      if p.is_file() and _NAME.match(p.name[:-len(SUFFIX)]))

    def choose(self, header: Optional[str], user: Optional[str]) -> Optional[str]:
        """The profile a request names (header, then ``user``), else the default; ``None`` if none applies."""
        for given in (header, user):
            if given is not None and str(given).strip():
                return str(given).strip()
        if self.default is not None:
            return self.default
        if self.root is not None and (self.root / ("default" + SUFFIX)).is_file():
            return "default"
        return None

    def read(self, name: str) -> str:
        """The profile's text, read now (an edit applies to the next request)."""
        path = None if self.root is None or not _NAME.match(name) else self.root / (name + SUFFIX)
        if path is None or not path.is_file():
            raise UnknownProfileError(name, self.names())
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_PROFILE_BYTES + 1)
        except OSError as e:
            raise ProfileError(f"profile {name!r} cannot be read ({type(e).__name__})") from None
        if len(data) > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {name!r} is over {MAX_PROFILE_BYTES >> 20} MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProfileError(f"profile {name!r} is not UTF-8 text") from None
        if not text.strip():
            raise ProfileError(f"profile {name!r} is empty")
        return text

    def context(self, header: Optional[str], user: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """``(profile name, its text)`` for a request, or ``(None, None)`` when no profile applies."""
        name = self.choose(header, user)
        if name is None:
            return None, None
        return name, self.read(name)
