"""The resume file: the tracks the service acknowledged, so that a run that stopped goes on where it was."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from app.ingest.errors import IngestError

# -- state -----------------------------------------------------------------------------------------------------


@dataclass
class State:
    """The tracks the service acknowledged (track -> its person), for one tracks file and camera."""

    path: Path
    tracks_sha256: str
    camera: str
    sent: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, tracks_sha256: str, camera: str) -> State:
        if not os.access(path.parent, os.W_OK):  # found now, not once the service has taken the first tracks
            raise IngestError(f"cannot write the state file {path} (its folder is not writable): pass --state")
        if not path.exists():
            return cls(path, tracks_sha256, camera)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored_sha, stored_camera, sent = data["tracks_sha256"], data["camera"], dict(data["sent"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IngestError(f"cannot read the state file {path} ({exc}): delete it to start over") from None
        if stored_sha != tracks_sha256 or stored_camera != camera:
            raise IngestError(
                f"the state file {path} belongs to another run (camera {stored_camera!r} and another tracks "
                "file's content): pass another --state, or delete it to send every track again"
            )
        return cls(path, tracks_sha256, camera, sent)

    def record(self, answered: dict[str, str | None]) -> None:
        """Add acknowledged tracks, atomically: a crash leaves the previous file or this one, never half. (Not
        ``models.files.atomic_path``: importing ``models`` imports torch, which this client does without.)"""
        self.sent.update(answered)
        data = {"tracks_sha256": self.tracks_sha256, "camera": self.camera, "sent": self.sent}
        temp = None
        try:
            fd, temp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException as exc:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            if isinstance(exc, OSError):  # a rerun sends these tracks again under the same keys: answered, not twice
                raise IngestError(f"cannot write the state file {self.path}: {exc}") from None
            raise
