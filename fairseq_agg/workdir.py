"""Output folders a tool may clear: only those it made itself.

Each folder a tool creates (its ``--workdir``/``--out``, and the folders inside it that a re-run
replaces) gets a stamp file naming the tool, written before anything else, so that a folder left
half-written by an interrupted run is still recognised as the tool's. A tool writes into, clears or
replaces a folder only when the folder is missing, empty or carries its own stamp; any other
folder is refused with one line (:class:`~fairseq_agg.errors.AggConfigError`) naming it and the fix.

    owner = Owner("fairseq-agg-demo", "--workdir")
    owner.refuse_unless_ours(workdir, workdir / "data-bin")   # every folder, before any long work
    owner.claim(workdir)                                       # created (or kept) and stamped
    owner.replace(workdir / "data-bin")                        # emptied, stamp kept

No fairseq import: the plain-PyTorch and Hugging Face tools use it too.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fairseq_agg.errors import AggConfigError

STAMP_NAME = ".fairseq-agg-owner"


@dataclass(frozen=True)
class Owner:
    """A tool's claim on its output folders.

    ``tool`` is written into the stamp and named in refusals; ``option`` is the command-line
    option that picks the folder, named in the fix.
    """

    tool: str
    option: str

    def refuse_unless_ours(self, *folders: Path) -> None:
        """Raise :class:`AggConfigError` unless every folder is missing, empty or this tool's.
        Changes nothing, so a tool can check all its folders before any long work starts."""
        for folder in map(Path, folders):
            problem = self._problem(folder)
            if problem:
                raise AggConfigError(f"{problem}; pass another {self.option} or remove it yourself")

    def claim(self, folder: Path) -> Path:
        """The folder, created if missing and stamped as this tool's; what it holds stays."""
        folder = Path(folder)
        self.refuse_unless_ours(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = folder / STAMP_NAME
        if not stamp.is_file():
            stamp.write_text(json.dumps({"written_by": self.tool}) + "\n", encoding="utf-8")
        return folder

    def replace(self, folder: Path) -> Path:
        """The folder, emptied if it is this tool's (created if missing), and stamped."""
        folder = self.claim(folder)
        for entry in folder.iterdir():
            if entry.name == STAMP_NAME:
                continue  # removed last, never: an interrupted clear leaves a folder still ours
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return folder

    def _problem(self, folder: Path) -> Optional[str]:
        if not folder.exists() and not folder.is_symlink():
            return None
        if not folder.is_dir():
            return f"{folder} is not a folder"
        if not any(folder.iterdir()):
            return None
        owner = stamp_owner(folder)
        if owner == self.tool:
            return None
        if owner is None:
            return f"{folder} holds files that {self.tool} did not write (no {STAMP_NAME} stamp)"
        return f"{folder} was written by {owner}, not by {self.tool}"


def stamp_owner(folder: Path) -> Optional[str]:
    """The tool named by the folder's stamp; None without a readable stamp."""
    try:
        return json.loads((Path(folder) / STAMP_NAME).read_text(encoding="utf-8")).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None
