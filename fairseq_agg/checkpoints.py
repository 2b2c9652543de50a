"""Integrity of checkpoint files, and which checkpoint a resume loads (no fairseq import:
``fairseq-train`` under the plug-in and ``fairseq-agg-eval`` share it).

``torch.load`` checks no CRC, so a checkpoint whose tensor data was damaged on disk or in a copy
loads silently. Every checkpoint fairseq-train writes under the plug-in is therefore *sealed*: a
BLAKE2b digest of the archive's bytes is stored as its zip comment, the last bytes of the file,
which ``torch.load``, stock fairseq tools and zip readers ignore. The seal goes into the temporary
file before it is renamed into place, so a file and its seal never disagree after a crash, and
fairseq's byte copies (``checkpoint_last.pt``, ``checkpoint_best.pt``) carry it along. A file
without a seal (stock fairseq, or an older fairseq-agg) is checked for a complete zip directory only.
"""

import logging
import os
import shlex
import warnings
import zipfile
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Optional, Tuple

import torch

from fairseq_agg.errors import AggConfigError

logger = logging.getLogger(__name__)

SEAL_PREFIX = b"fairseq-agg blake2b-256 "
_END_OF_ARCHIVE = b"PK\x05\x06"  # signature of zip's end-of-central-directory record
_END_RECORD_SIZE = 22  # that record without a comment; its last 2 bytes are the comment's length
_READ_CHUNK = 8 << 20


# -- the seal ---------------------------------------------------------------------------------------
def _digest(f, length: int) -> str:
    """BLAKE2b-256 of the next ``length`` bytes of ``f``, read in chunks (constant memory)."""
    digest = blake2b(digest_size=32)
    buffer = memoryview(bytearray(_READ_CHUNK))
    while length > 0:
        n = f.readinto(buffer[: min(_READ_CHUNK, length)])
        if not n:
            raise EOFError("the file ended before the length its archive records")
        digest.update(buffer[:n])
        length -= n
    return digest.hexdigest()


def seal(path) -> bool:
    """Store the digest of the archive ``torch.save`` wrote at ``path`` as its zip comment.

    The digest covers every byte before the comment's length field. False, with the file
    untouched, when it is no zip archive without a comment (torch's legacy format, or sealed).
    """
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size < _END_RECORD_SIZE:
            return False
        f.seek(size - _END_RECORD_SIZE)
        end = f.read(_END_RECORD_SIZE)
        if not end.startswith(_END_OF_ARCHIVE) or end[-2:] != b"\0\0":
            return False
        f.seek(0)
        comment = SEAL_PREFIX + _digest(f, size - 2).encode()
        f.seek(size - 2)
        f.write(len(comment).to_bytes(2, "little") + comment)
    return True


def seal_matches(path) -> Optional[bool]:
    """Whether the bytes of ``path`` match its seal; None when it carries none (or is no
    complete zip archive: :func:`damage` tells those apart)."""
    try:
        with zipfile.ZipFile(path) as archive:
            comment = archive.comment
    except (zipfile.BadZipFile, OSError):
        return None
    if not comment.startswith(SEAL_PREFIX):
        return None
    covered = os.path.getsize(path) - len(comment) - 2
    try:
        with open(path, "rb") as f:
            return _digest(f, covered) == comment[len(SEAL_PREFIX):].decode("ascii", "replace")
    except EOFError:
        return False


def checksum_mismatch(path) -> Optional[str]:
    """One line when ``path`` is sealed and its bytes do not match the seal, else None."""
    if seal_matches(path) is False:
        return f"checkpoint {path} {_MISMATCH}; give an intact copy of it, or another checkpoint"
    return None


_MISMATCH = "fails its checksum (its bytes changed after it was written: a disk or copy error)"


def _complete_archive(path: Path) -> bool:
    """A copy interrupted part-way is empty or ends before the zip directory that ``torch.save``
    writes last; only that directory is read. Files in torch's legacy (non-zip) format pass."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        return len(head) == 4
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def damage(path) -> Optional[str]:
    """What keeps ``path`` from loading as it was written, in words ("is truncated", ...);
    None for an intact file. Reads the whole file when it is sealed."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "is empty (a copy interrupted while it was written)"
        if not _complete_archive(path):
            return "is truncated (a copy interrupted while it was written)"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if seal_matches(path) is False:
        return _MISMATCH
    return None


# -- what a checkpoint records of its training ---------------------------------------------------------
@dataclass
class TrainingProgress:
    num_updates: int
    criterion_class: Optional[str]  # as fairseq's optimizer history names it
    criterion: Optional[str]  # the --criterion it was trained with
    has_optimizer_state: bool


def training_progress(path) -> Optional[TrainingProgress]:
    """Read from the checkpoint's pickle alone: its tensors are memory-mapped, not read. None
    when the file cannot be unpickled or holds no fairseq training state."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=False)  # torch's legacy format
    except Exception:  # noqa: BLE001 - a damaged pickle raises almost anything
        return None
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    if not history or "num_updates" not in history[-1]:
        return None
    cfg, legacy = state.get("cfg") or {}, state.get("args")  # args: fairseq < 0.10
    criterion = (cfg.get("criterion") or {}).get("_name") if cfg else getattr(legacy, "criterion", None)
    return TrainingProgress(
        num_updates=int(history[-1]["num_updates"]),
        criterion_class=history[-1].get("criterion_name"),
        criterion=criterion,
        has_optimizer_state=state.get("last_optimizer_state") is not None,
    )


# -- which checkpoint a resume loads --------------------------------------------------------------------
def most_trained_intact_checkpoint(save_dir, exclude: str = "") -> Optional[Tuple[Path, int]]:
    """The intact ``checkpoint*.pt`` of ``save_dir`` (but ``exclude``) that has trained the most
    updates, with that count. Ranked by the count each file records (file times say nothing: a
    copy or a restore from backup renews them); only the candidates up to the first intact one
    are read whole."""
    ranked = []
    for path in Path(save_dir).glob("checkpoint*.pt"):
        progress = training_progress(path) if path.name != exclude else None
        if progress is not None:
            ranked.append((progress.num_updates, path.name, path))
    for updates, _, path in sorted(ranked, reverse=True):
        if damage(path) is None:
            return path, updates
    return None


def checkpoint_to_resume(filename: str) -> str:
    """``filename``, or when it is a damaged ``checkpoint_last.pt`` the intact checkpoint beside
    it that has trained the most updates; any other damaged checkpoint is refused in one line
    that names a command that works."""
    path = Path(filename)
    if not path.is_file():
        return filename
    problem = damage(path)
    if problem is None:
        return filename
    fallback = most_trained_intact_checkpoint(path.parent, exclude=path.name)
    if fallback is not None and path.name == "checkpoint_last.pt":
        logger.warning(
            f"{path} {problem}; resuming from {fallback[0]} ({fallback[1]} updates), the intact "
            f"checkpoint of {path.parent} that has trained the most updates"
        )
        return str(fallback[0])
    if fallback is not None:
        # fairseq reads --restore-file relative to the current folder: an absolute path always works.
        fix = (f"the intact checkpoint there with the most updates is {fallback[0]} ({fallback[1]} updates): "
               f"resume from it with --restore-file {shlex.quote(str(fallback[0].resolve()))}")
    elif path.name == "checkpoint_last.pt":
        fix = (f"no other checkpoint in {path.parent} is intact: move {path.name} out of that folder "
               f"(or train into another --save-dir) to start afresh")
    else:
        fix = f"no other checkpoint in {path.parent} is intact: give --restore-file an intact checkpoint"
    raise AggConfigError(f"{path} {problem} and cannot be loaded; {fix}")
