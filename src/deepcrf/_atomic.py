"""Atomic file writes: never leave user data half-written or overwritten on failure."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic.
    On any exception the temporary file is removed and ``path`` is left untouched.

    Example:
        >>> with atomic_path("out.png") as tmp:  # doctest: +SKIP
        ...     image.save(tmp, format="PNG")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 (and some writers replace the file with their own): the result
        # gets the mode any other tool would give it (0666 less the umask, 0644 under 022), so
        # that others on shared storage can read it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_outputs(
    outputs: Iterable[str | os.PathLike[str]],
    inputs: Iterable[str | os.PathLike[str]],
    *,
    overwrite: bool,
) -> None:
    """Check the outputs before anything is written.

    None may be an input or a folder, and without ``overwrite`` none may exist already.

    Raises:
        ValueError: naming the first offending output (and how many exist already).
    """
    outs = [Path(o) for o in outputs]
    sources = {Path(i).resolve() for i in inputs}
    for out in outs:
        if out.resolve() in sources:
            raise ValueError(f"output {out} is one of the inputs; refusing to overwrite it")
        if out.is_dir():
            raise ValueError(f"output {out} is a folder")
    existing = [str(o) for o in outs if o.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise ValueError(
            f"{len(existing)} output file(s) exist already ({shown}): pass --overwrite to "
            "replace them, or write elsewhere"
        )
