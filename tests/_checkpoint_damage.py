"""Damage done to checkpoint files on purpose, as a disk or a copy would do it."""

import zipfile
from pathlib import Path


def zero_inside_largest_tensor(path, nbytes: int = 4096) -> None:
    """Zero ``nbytes`` in the middle of the largest tensor record of a ``torch.save`` archive:
    the zip directory stays intact and ``torch.load`` checks no CRC, so the file still loads."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert record.file_size >= 2 * nbytes, "the largest tensor is too small to damage inside"
    with open(path, "r+b") as f:
        f.seek(record.header_offset)
        header = f.read(30)  # zip local file header: name and extra-field lengths at 26 and 28
        data_start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        f.seek(data_start + record.file_size // 2 - nbytes // 2)
        f.write(b"\0" * nbytes)


def strip_seal(path) -> None:
    """Make ``path`` what torch.save wrote before the plug-in sealed it (as stock fairseq does)."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        comment = archive.comment
    assert comment, f"{path} is not sealed"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(comment) - 2] + b"\0\0")  # the comment's length, 0
