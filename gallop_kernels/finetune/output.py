"""The output folder of a ``gallop`` run: written under a temporary name and renamed when the run succeeds
(OutputFolder), or, for ``compare`` and a ``finetune`` that checkpoints, written in place as results or
checkpoints come in and kept once one is saved (GrowingFolder)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import GallopError


class OutputFolder:
    """A run's output folder: a temporary folder next to it while the run writes, renamed at the end.

    Created and probed (a file made and removed) on entry, before any slow work; GallopError
    names the path when that fails. ``final`` must be new or an empty folder. On an exception
    the temporary folder and the parent folders it created are removed, so a failed run leaves
    nothing behind.
    """

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.path = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
        self._made: list[Path] = []

    def _check_new(self, hint: str = "choose a new one") -> None:
        """GallopError unless ``final`` is new or an empty folder this process can write to."""
        if self.final.exists():
            if not self.final.is_dir() or any(self.final.iterdir()):
                raise GallopError(f"--out {self.final} already exists and is not an empty folder; {hint}")
            self._probe(self.final)

    def __enter__(self) -> OutputFolder:
        self._check_new()  # the rename at the end replaces an empty final folder
        try:
            self._mkdirs(self.final.parent)
            self.path.mkdir()
            self._made.append(self.path)
        except OSError as e:
            self._remove()
            raise GallopError(f"cannot create {e.filename or self.path}: {e.strerror}") from None
        self._probe(self.path)
        return self

    def _mkdirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            f.mkdir()
            self._made.append(f)

    def _probe(self, folder: Path) -> None:
        probe = folder / f".gallop-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._remove()
            raise GallopError(f"cannot write to {folder}: {e.strerror}") from None

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """The temporary path of ``name`` to write to; an OSError while writing becomes GallopError naming it."""
        try:
            yield self.path / name
        except OSError as e:
            raise GallopError(f"cannot write {self.final / name}: {e.strerror or e}") from None

    def write_text(self, name: str, text: str) -> None:
        """Write the text file ``name`` in the folder; GallopError names the path on failure."""
        with self.writing(name) as path:
            path.write_text(text)

    def _remove(self) -> None:
        for f in reversed(self._made):
            if f == self.path:
                shutil.rmtree(f, ignore_errors=True)
            else:
                _rmdir_if_empty(f)
        self._made = []

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            self._remove()
            return
        try:
            os.replace(self.path, self.final)
        except OSError as e:
            self._remove()
            raise GallopError(f"cannot rename {self.path} to {self.final}: {e.strerror}") from None


class GrowingFolder(OutputFolder):
    """An output folder written in place while results come in (``gallop compare``, and ``gallop finetune``
    with ``--save-every``: its checkpoints).

    Each file is written beside its name and renamed over it, so neither a reader nor an
    interruption ever sees half a file. Until :meth:`keep` is called (the first result or checkpoint saved) a
    failure removes the folder and the parents it created, as OutputFolder does; after it the
    folder stays with what was saved. ``resume=True`` reopens a folder an earlier run kept.
    """

    def __init__(self, final: str | Path, resume: bool = False, what: str = "compare"):
        super().__init__(final)
        self.path = self.final
        self.resume = resume
        self.kept = resume
        self.what = what
        """What the folder holds, for messages: "compare", "run"."""

    def __enter__(self) -> GrowingFolder:
        if self.resume:
            if not self.final.is_dir():
                raise GallopError(f"--resume: {self.final} is not a folder; give the --out of the {self.what} "
                                  f"to continue")
        else:
            self._check_new(f"choose a new one, or add --resume to continue the {self.what} it holds")
            try:
                self._mkdirs(self.final)
            except OSError as e:
                self._remove()
                raise GallopError(f"cannot create {e.filename or self.final}: {e.strerror}") from None
        self._probe(self.final)
        return self

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A path beside ``name`` to write to (same suffix, so writers that go by it still can), renamed over
        ``name`` when the block ends; GallopError names the file when writing fails."""
        target = self.final / name
        aside = self.final / f".{target.stem}.tmp-{os.getpid()}{target.suffix}"
        try:
            yield aside
            os.replace(aside, target)
        except OSError as e:
            raise GallopError(f"cannot write {target}: {e.strerror or e}") from None
        finally:
            aside.unlink(missing_ok=True)

    def keep(self) -> None:
        """From now on a failure leaves the folder and what it holds."""
        self.kept = True

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None and not self.kept:
            self._remove()


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: something else wrote there meanwhile, keep it


@contextlib.contextmanager
def main_rank_folder(make: Callable[[], OutputFolder]) -> Iterator[OutputFolder | None]:
    """The folder ``make()`` returns (an OutputFolder or GrowingFolder) on rank 0 of a torchrun job (or in
    one process), None on the other ranks, which write nothing. Rank 0 creates and probes it first; a
    refusal stops every rank with rank 0's message."""
    from . import parallel

    folder = make() if parallel.is_main() else None
    parallel.on_main(folder.__enter__ if folder is not None else lambda: None)
    if folder is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        stack.push(folder)  # entered above: only its exit (rename, or removal on error) is left
        yield folder
