"""The one exception type of the data package.

Every problem with a dataset file (missing, corrupt, wrong checksum, unsafe pickle,
failed download) raises :class:`DatasetError` with a message that names the file and
says what to do about it, so a user never has to read a traceback to recover.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DatasetError", "corrupt_file_error"]


class DatasetError(RuntimeError):
    """A dataset file is missing, corrupt, unsafe or could not be downloaded."""


def corrupt_file_error(path: str | Path, problem: str) -> DatasetError:
    """Build the error for a damaged file: what is wrong with it and how to replace it."""
    return DatasetError(
        f"{path}: {problem}. The file is corrupt or incomplete: delete it and load the "
        "dataset again to re-download it (canonical sources: lookahead_prune.data.sources)."
    )
