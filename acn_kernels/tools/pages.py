"""The docs pages' generated blocks: what a measuring command printed, kept verbatim in a page between
two markers, so that the prose around it stays hand-written and the numbers stay the tool's.

`python -m acn_kernels traffic --markdown docs/traffic.md` runs the command and writes its output into
the page's block for that command (adding the block at the end if the page has none); `--check PATH`
runs it and fails when the block differs, which CI does for the deterministic reports.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import pathlib
import sys


def markers(command: str) -> tuple[str, str]:
    return (f"<!-- begin output of `python -m acn_kernels {command}`: generated, `{command} --markdown PAGE` "
            f"rewrites it and `{command} --check PAGE` compares -->", f"<!-- end output of {command} -->")


def block(command: str, output: str) -> str:
    begin, end = markers(command)
    return f"{begin}\n```text\n{output.rstrip()}\n```\n{end}"


def _split(text: str, command: str) -> tuple[str, str, str] | None:
    """(before, the block, after) of a page's block for `command`, or None where it has none."""
    begin, end = markers(command)
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        return None
    return text[:start], text[start:stop + len(end)], text[stop + len(end):]


def write_block(path: str, command: str, output: str) -> None:
    page = pathlib.Path(path)
    text = page.read_text() if page.exists() else f"# {command}\n"
    parts = _split(text, command)
    new = block(command, output)
    text = f"{parts[0]}{new}{parts[2]}" if parts else f"{text.rstrip()}\n\n{new}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def missing_block(path: str, command: str) -> str | None:
    """Why `path` cannot be compared with `command`'s output (no such file, no block of it), or None:
    asked before the command runs, since some take minutes."""
    page = pathlib.Path(path)
    if not page.is_file():
        return f"--check: {path} is not a file"
    if _split(page.read_text(), command) is None:
        return f"--check: {path} has no block of `{command}` output (write one with --markdown {path})"
    return None


def block_difference(path: str, command: str, output: str) -> str | None:
    """Why the page's block is not this output (its first differing lines), or None when it is."""
    page = pathlib.Path(path)
    parts = _split(page.read_text(), command) if page.exists() else None
    if parts is None:
        return f"{path} has no block of `{command}` output"
    expected = block(command, output)
    if parts[1] == expected:
        return None
    diff = difflib.unified_diff(parts[1].splitlines(), expected.splitlines(), "the page", "this run", n=0,
                                lineterm="")
    return "\n".join(list(diff)[2:8])


@contextlib.contextmanager
def captured_stdout():
    """Everything printed inside, still printed, and kept in the yielded buffer."""
    kept = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text):
            kept.write(text)
            return original.write(text)

        def flush(self):
            original.flush()

    original = sys.stdout
    sys.stdout = Tee()
    try:
        yield kept
    finally:
        sys.stdout = original
