"""Writing a user's files safely: to a temporary name beside the target, then renamed over it, so an
interrupted write never leaves a half-written or truncated file."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import TinyLLMError


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def check_writable(path, option: str | None = None) -> Path:
    """The checks `write_bytes_atomic` makes, on their own: a command that writes its results after
    minutes of work (`bench --json/--plot`) makes them first. `option` names the flag in the error."""
    where = f"{option} {path}" if option else str(path)
    if not str(path):
        raise TinyLLMError(f"{option or 'the file name'} is empty: give a file to write")
    path = Path(path)
    if path.is_dir():
        raise TinyLLMError(f"{where} is a directory, not a file to write")
    if not path.parent.is_dir():
        why = "is not a directory" if path.parent.exists() else "does not exist"
        raise TinyLLMError(f"cannot write {where}: {path.parent} {why}")
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a result file should not be
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the real name
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(fig, path) -> Path:
    """A matplotlib figure as a PNG at `path`, written atomically (a failed write leaves no half file)."""
    import io

    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, png.getvalue())


def usual_permissions(path, mode: int) -> None:
    """Give `path` the permissions a plain open()/mkdir() would: `mode` minus the umask (mkstemp and
    mkdtemp make private files, and safetensors writes 0600; a model directory should not be private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def move_dir_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory `tmp` onto `out_dir`, first setting aside any old `out_dir`.

    A directory cannot be renamed over a non-empty one, so an old one is moved to a hidden name, the
    new one takes its place, and only then is the old one deleted; if the swap fails the old one is
    put back. So the old directory is never destroyed before the new one is complete."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        os.replace(out_dir, old / "model")
    except BaseException:  # the old one stays where it was; its empty hiding place goes
        old.rmdir()
        raise
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "model", out_dir)  # should this fail too, the old one stays in `old`, not deleted
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
