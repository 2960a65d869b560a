"""Checkpoint files written atomically, and a damaged one named with the newest intact alternative.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin (the public interface through which
``Trainer.save_checkpoint`` and ``--ckpt_path`` reach the disk) that wraps another one:

- **save**: the wrapped plugin writes ``.<name>.partial`` beside the target, which is then renamed
  over it (``os.replace``, atomic on POSIX): a process killed mid-write leaves the previous
  ``last.ckpt`` whole, never a truncated one. A hook then writes what belongs beside the file (the PEFT
  adapter folder of ``callbacks.AdapterCheckpoint``);
- **remove**: also removes what the hook wrote beside the file;
- **load**: a file that is not an intact checkpoint stops the run with one line naming it and the
  newest intact checkpoint of its folder.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

PARTIAL_PREFIX = "."
PARTIAL_SUFFIX = ".partial"


class DamagedCheckpointError(ValueError):
    """``--ckpt_path`` names a file that is not a complete checkpoint."""


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where a checkpoint is written before the rename: ``dir/last.ckpt`` -> ``dir/.last.ckpt.partial``."""
    target = Path(path)
    return target.with_name(PARTIAL_PREFIX + target.name + PARTIAL_SUFFIX)


def checkpoint_damage(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not an intact ``torch.save`` checkpoint (a zip archive whose CRCs check), or ``None``.

    Reads the whole file once; loads nothing.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as error:
        return f"not a complete checkpoint archive ({error})"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return f"corrupt member {bad!r}" if bad is not None else None


def newest_intact_checkpoint(folder: str | os.PathLike[str], *, excluding: Path | None = None) -> Path | None:
    """The most recently written intact ``*.ckpt`` in ``folder`` (other than ``excluding``), or ``None``."""
    candidates = [p for p in Path(folder).glob("*.ckpt") if p.is_file() and p != excluding]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_damage(candidate) is None:
            return candidate
    return None


def refuse_damaged_checkpoint(path: str | os.PathLike[str], *, flag: str = "--ckpt_path") -> None:
    """Raises :class:`DamagedCheckpointError` when ``path`` is a file but not an intact checkpoint: one line
    naming ``flag``, the file, the damage and the newest intact checkpoint of its folder. Anything else
    (an intact file, a folder, a missing path) passes; reads the file once, loads nothing.
    """
    if not Path(path).is_file() or (damage := checkpoint_damage(path)) is None:
        return
    newest = newest_intact_checkpoint(Path(path).parent, excluding=Path(path))
    alternative = (
        f"the newest intact checkpoint there is {str(newest)!r}" if newest else "no intact one is there"
    )
    raise DamagedCheckpointError(f"{flag} {str(path)!r} is damaged: {damage}; {alternative}")


class AtomicCheckpointIO(CheckpointIO):
    """Writes checkpoints through ``inner`` into a temporary file renamed over the target.

    Args:
        inner: The plugin that serialises (default :class:`TorchCheckpointIO`).
        after_save: Called with the final path and the checkpoint once the file is in place (e.g. an
            adapter export).
        after_remove: Called with the path of a removed checkpoint (e.g. to remove that export).
    """

    def __init__(
        self,
        inner: CheckpointIO | None = None,
        *,
        after_save: Callable[[Path, dict[str, Any]], None] | None = None,
        after_remove: Callable[[Path], None] | None = None,
    ) -> None:
        self.inner = inner if inner is not None else TorchCheckpointIO()
        self.after_save = after_save
        self.after_remove = after_remove

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = partial_path(target)
        try:
            self.inner.save_checkpoint(checkpoint, staging, storage_options=storage_options)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        if self.after_save is not None:
            self.after_save(target, checkpoint)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> Any:
        refuse_damaged_checkpoint(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        if self.after_remove is not None:
            self.after_remove(Path(path))

    def teardown(self) -> None:
        self.inner.teardown()
