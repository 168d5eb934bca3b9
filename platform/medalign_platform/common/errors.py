"""The platform's error types: each one is printed by the CLI as one line naming the fix.

Every error a user can cause by what they type or point at (a config value, a file, a
dataset record, a search-space entry) derives from :class:`MedAlignError`, so the CLI can
print its message without a traceback and exit with status 2. Errors raised inside Ray
workers reach the driver wrapped (``RayTaskError``, Ray Train's worker-group error, Tune's
errors): :func:`platform_error` finds the platform error inside such a wrapper, and
:func:`one_line` turns any error into the one line the CLI prints.
"""

from __future__ import annotations

import errno


class MedAlignError(Exception):
    """Base class of errors caused by input; the message says what is wrong and how to fix it."""


class ConfigError(MedAlignError, ValueError):
    """A config value, override or path is wrong; the message names the key and the fix."""


class ImageReadError(MedAlignError, ValueError):
    """An image (or mask) file cannot be decoded; the message names the file."""


def image_read_error(path, error: BaseException) -> ImageReadError:
    """The one-line error for an unreadable image file at ``path``."""
    return ImageReadError(f"unreadable image {path} ({type(error).__name__}: {error}); replace or re-create the file "
                          f"(data.validate_images=true finds every bad image before training starts)")


class ClusterError(MedAlignError, RuntimeError):
    """The Ray cluster cannot run what was asked (unreachable address, resources it can never offer)."""


def _inner_errors(error: BaseException) -> list[BaseException]:
    """The exceptions an error wraps: its cause and context, Ray's ``cause`` and per-worker failures."""
    inner = [error.__cause__, error.__context__, getattr(error, "cause", None)]
    failures = getattr(error, "worker_failures", None)  # Ray Train V2's WorkerGroupError: {rank: exception}
    if isinstance(failures, dict):
        inner += list(failures.values())
    inner += [arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)]
    return [e for e in inner if isinstance(e, BaseException)]


def platform_error(error: BaseException) -> MedAlignError | None:
    """The :class:`MedAlignError` that ``error`` is or wraps (breadth-first), else None."""
    seen, queue = set(), [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MedAlignError):
            # Ray's RayTaskError.as_instanceof_cause() subclasses the cause: its message is the
            # remote traceback, the original error (with the platform's message) is ``cause``.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, MedAlignError) else current
        queue += _inner_errors(current)
    return None


_OS_FIXES = {
    errno.ENOSPC: "free disk space there (checkpoints already written are intact), then run the same command "
                  "with resume=true",
    errno.EDQUOT: "raise the quota or free space, then run the same command with resume=true",
    errno.EACCES: "check the permissions of that path, or choose another output folder",
    errno.EPERM: "check the permissions of that path, or choose another output folder",
    errno.EROFS: "the filesystem is read-only: choose a writable output folder",
    errno.ENOENT: "check the path",
}


def one_line(error: BaseException) -> tuple[str, int]:
    """The one line the CLI prints for ``error`` and the exit status that goes with it.

    Platform errors (bad input) give their own message and status 2; operating-system
    errors (a full disk, a permission) name the file and the fix, status 1; anything else
    is an internal error, status 1, with a pointer to ``--debug``.
    """
    found = platform_error(error)
    if found is not None:
        return _first_line(str(found)), 2
    os_error = next((e for e in [error, *_inner_errors(error)] if isinstance(e, OSError) and e.errno), None)
    if os_error is not None:
        where = f" ({os_error.filename})" if os_error.filename else ""
        fix = _OS_FIXES.get(os_error.errno, "fix the cause and run the command again")
        return f"{os_error.strerror or os_error}{where}; {fix}", 2 if os_error.errno == errno.ENOENT else 1
    if isinstance(error, FileNotFoundError):
        return _first_line(str(error)), 2
    return (f"internal error: {type(error).__name__}: {_first_line(str(error))} "
            f"(run again with --debug for the traceback)"), 1


def _first_line(text: str) -> str:
    """The first non-empty line of a message (Ray's wrappers append tracebacks below it)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""
