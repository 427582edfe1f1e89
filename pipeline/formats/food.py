"""Food-101: safe archive extraction, the dataset layout, and image decoding.

The layout (ETH's ``food-101.tar.gz`` and the subsets made from it)::

    food-101/images/<class>/<id>.jpg
    food-101/meta/classes.txt          one class name a line
    food-101/meta/train.json           {"<class>": ["<class>/<id>", ...], ...}   (no .jpg)
    food-101/meta/test.json

An item is a pair ``(relative_path, class_name)`` with ``relative_path`` like
``"images/apple_pie/1005649.jpg"``, relative to the Food-101 root (the directory holding ``meta/``).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from ..errors import ConfigError, FormatError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
Item = tuple[str, str]

# What a damaged archive raises from tarfile or the decompressor under it (a damaged .bz2 raises a
# plain OSError, which is left alone: it cannot be told apart from a full disk).
_ARCHIVE_DAMAGE = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)


# ---------------------------------------------------------------- extraction


class _CountingReader:
    """A read-only file object that counts the (decompressed) bytes handed out."""

    def __init__(self, fileobj: IO[bytes]):
        self._f = fileobj
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.count += len(data)
        return data


def _open_decompressed(archive: Path) -> IO[bytes]:
    with open(archive, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return open(archive, "rb")


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member that could write outside the target or is not a plain file or directory."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[0].isalpha() and name[1] == ":"):
        raise FormatError(
            f"{archive}: member {name!r} has an absolute path; expected paths relative to the archive "
            f"root. Refusing to extract: the archive is not a genuine dataset archive"
        )
    if ".." in path.parts or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise FormatError(
            f"{archive}: member {name!r} climbs out of the target directory with '..'. Refusing to "
            f"extract: the archive is not a genuine dataset archive"
        )
    if member.issym() or member.islnk():
        raise FormatError(
            f"{archive}: member {name!r} is a {'symbolic' if member.issym() else 'hard'} link to "
            f"{member.linkname!r}; expected only regular files and directories. Refusing to extract"
        )
    if not (member.isfile() or member.isdir()):
        kind = ("character device" if member.ischr() else "block device" if member.isblk()
                else "fifo" if member.isfifo() else f"type {member.type!r}")
        raise FormatError(
            f"{archive}: member {name!r} is a {kind}; expected only regular files and directories. "
            f"Refusing to extract"
        )


def extract_archive(archive: str | Path, target_dir: str | Path) -> Path:
    """Extract a tar archive (plain, .gz, .bz2 or .xz; detected from its bytes) into ``target_dir``.

    The archive is read in one streaming pass. Every member is checked before it is written:
    absolute paths, ``..`` components, symbolic and hard links, devices and fifos are refused.
    Extraction goes into a temporary sibling of ``target_dir`` that is renamed into place only
    after the whole archive (including the compressed stream's checksum and tar's end-of-archive
    blocks) has been read, so a failure leaves nothing behind.

    Args:
        archive: the archive file.
        target_dir: the directory to create; it must not exist, or be empty.

    Returns:
        ``target_dir`` as a Path, holding the archive's members.

    Raises:
        FileNotFoundError: no archive.
        ConfigError: ``target_dir`` exists and is not an empty directory.
        FormatError: a refused member, or a truncated, damaged or non-tar archive.
    """
    archive, target = Path(archive), Path(target_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"{target}: the extraction target exists and is not an empty directory; remove it or choose another"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
    done = False
    n_files = 0
    try:
        with _open_decompressed(archive) as raw:
            reader = _CountingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        _check_member(archive, member)
                        if member.isdir():
                            # created here with the default mode: a read-only directory mode in
                            # the archive would make the extracted tree impossible to clean up
                            (tmp / member.name).mkdir(parents=True, exist_ok=True)
                            continue
                        # The 'data' filter is a second line of defence (and drops setuid bits,
                        # owners); the checks above give the clearer message.
                        tar.extract(member, tmp, filter="data")
                        n_files += 1
                        if n_files % 10000 == 0:
                            log.info("%s: extracted %d files", archive, n_files)
                    end_of_members = tar.offset
                # tarfile stops at the first zero block without reading the rest; drain the stream
                # so the decompressor verifies its checksum, and check the two end-of-archive blocks
                # exist (an archive cut at a member boundary otherwise reads as complete).
                while reader.read(1 << 20):
                    pass
            except tarfile.FilterError as exc:
                raise FormatError(f"{archive}: refusing to extract a member: {exc}") from exc
            except _ARCHIVE_DAMAGE as exc:
                raise FormatError(
                    f"{archive}: the archive is truncated or damaged after {n_files} files ({exc}); "
                    f"expected a complete tar archive: download it again"
                ) from exc
        if reader.count < end_of_members + 2 * tarfile.BLOCKSIZE:
            raise FormatError(
                f"{archive}: the archive is truncated: it ends at byte {reader.count} of the tar stream, "
                f"expected two end-of-archive blocks after the last member at byte {end_of_members}; "
                f"download it again"
            )
        if target.exists():
            target.rmdir()  # empty, checked above
        os.rename(tmp, target)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=False)
    log.info("extracted %d files from %s into %s", n_files, archive, target)
    return target


# ---------------------------------------------------------------- layout


def food101_root(root: str | Path) -> Path:
    """The Food-101 root under ``root``: ``root`` itself or ``root/food-101``, whichever holds ``meta/classes.txt``."""
    root = Path(root)
    for candidate in (root, root / "food-101"):
        if (candidate / "meta" / "classes.txt").is_file():
            return candidate
    raise FormatError(
        f"{root}: no meta/classes.txt in it or in {root / 'food-101'}; expected the Food-101 layout "
        f"(food-101/images/<class>/<id>.jpg, food-101/meta/classes.txt, meta/train.json, meta/test.json)"
    )


def read_classes(root: str | Path) -> list[str]:
    """The class names listed in ``meta/classes.txt``, in file order."""
    path = food101_root(root) / "meta" / "classes.txt"
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc}); expected one class name a line") from exc
    names = [n for n in names if n]
    if not names:
        raise FormatError(f"{path}: no class names; expected one class name a line")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise FormatError(f"{path}: class names listed twice: {dups}; expected each once")
    return names


def _select_classes(path: Path, available: list[str], classes: Iterable[str] | str | None) -> list[str]:
    if classes is None:
        return available
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    wanted = list(classes)
    if not wanted:
        raise ConfigError("classes is empty: pass None for all classes, or some of " + ", ".join(available))
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise ConfigError(
            f"unknown Food-101 class(es) {unknown} (classes come from {path}); available: {', '.join(available)}"
        )
    chosen = set(wanted)
    return [c for c in available if c in chosen]  # classes.txt order, so labels do not depend on the call


def read_food101(
    root: str | Path, classes: Iterable[str] | str | None = None, split: str = "train"
) -> list[Item]:
    """The items of one split of a Food-101 tree.

    Args:
        root: the Food-101 root (holding ``meta/``) or the directory it was extracted into.
        classes: class names to keep (a list, or one comma-separated string); None keeps all.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``[(relative_path, class_name), ...]`` ordered by class (``classes.txt`` order), then as
        listed in the split's json. Paths are relative to ``food101_root(root)``. Whether the image
        files exist and decode is checked by ``load_images``.

    Raises:
        ConfigError: unknown split, or a class not in ``classes.txt`` (the message lists them).
        FormatError: missing or malformed meta files.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    base = food101_root(root)
    available = read_classes(base)
    selected = _select_classes(base / "meta" / "classes.txt", available, classes)

    path = base / "meta" / f"{split}.json"
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; expected the Food-101 split file meta/{split}.json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc}); expected {{class: [\"class/id\", ...]}}") from exc
    if not isinstance(listing, dict):
        raise FormatError(f"{path}: holds a {type(listing).__name__}, expected an object {{class: [\"class/id\", ...]}}")
    extra = sorted(set(listing) - set(available))
    if extra:
        raise FormatError(f"{path}: classes {extra[:10]} are not in meta/classes.txt; the meta files disagree")

    items: list[Item] = []
    for cls in selected:
        entries = listing.get(cls, [])
        if not isinstance(entries, list):
            raise FormatError(f"{path}: the entry of {cls!r} is a {type(entries).__name__}, expected a list")
        if not entries:
            log.warning("%s: class %r has no %s images", path, cls, split)
        for entry in entries:
            if (not isinstance(entry, str) or PurePosixPath(entry).parent.as_posix() != cls
                    or PurePosixPath(entry).name in ("", ".", "..")):
                raise FormatError(
                    f"{path}: entry {entry!r} of class {cls!r} is not of the form '{cls}/<id>'; the file is malformed"
                )
            items.append((f"images/{entry}.jpg", cls))
    log.info("%s: %d %s images in %d classes", base, len(items), split, len(selected))
    return items


# ---------------------------------------------------------------- images


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """Decode an image file to RGB, resize its shorter side to ``size`` and centre-crop it square.

    Returns:
        a ``(size, size, 3)`` uint8 array.

    Raises:
        FormatError: the file is missing, not an image, or corrupt/truncated (the cause is kept).
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, still >= size
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8)
    except _image_damage() as exc:
        raise FormatError(f"{path}: not a decodable image ({type(exc).__name__}: {exc})") from exc


def _image_damage() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file that is not a decodable image: OSError (missing, unreadable,
    truncated data), SyntaxError (some broken PNG/GIF chunks), ValueError, DecompressionBombError."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"size must be a positive integer (pixels), got {size!r}")
    return int(size)


def iter_images(
    root: str | Path, items: Iterable[Item], size: int, bad: list[tuple[str, str]] | None = None
) -> Iterator[tuple[Item, np.ndarray]]:
    """Decode items one at a time, skipping (and logging) files that are missing or not images.

    Yields ``(item, image)`` with ``image`` a ``(size, size, 3)`` uint8 array. Each skipped item is
    logged and, if ``bad`` is given, appended to it as ``(relative_path, reason)``.
    """
    size = _check_size(size)
    base = food101_root(root)
    for item in items:
        try:
            image = decode_image(base / item[0], size)
        except FormatError as exc:
            reason = str(exc.__cause__) if exc.__cause__ is not None else str(exc)
            log.warning("skipping %s: %s", item[0], reason)
            if bad is not None:
                bad.append((item[0], reason))
            continue
        yield item, image


def load_images(
    root: str | Path, items: Sequence[Item], size: int
) -> tuple[np.ndarray, list[Item], list[tuple[str, str]]]:
    """Decode all ``items`` into one array, skipping corrupt, non-image or missing files.

    Returns:
        ``(images, kept, bad)``: ``images`` a ``(len(kept), size, size, 3)`` uint8 array whose row
        ``i`` is ``kept[i]``; ``bad`` the skipped ``(relative_path, reason)`` pairs. The count and the
        names of skipped files are logged as a warning.
    """
    size = _check_size(size)
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    kept: list[Item] = []
    bad: list[tuple[str, str]] = []
    for i, (item, image) in enumerate(iter_images(root, items, size, bad)):
        images[i] = image
        kept.append(item)
        if (i + 1) % 1000 == 0:
            log.info("decoded %d of %d images", i + 1 + len(bad), len(items))
    if bad:
        log.warning(
            "skipped %d of %d images that are missing, corrupt or not images: %s%s",
            len(bad), len(items), ", ".join(p for p, _ in bad[:20]), " ..." if len(bad) > 20 else "",
        )
    if bad:
        images = images[: len(kept)].copy()  # do not keep the rows of skipped files alive
    return images, kept, bad
