"""What binds a gallery's index to its database (``reid_meta``): the fingerprint of the weights that made the
embeddings, and the epoch, a random id the database gets when its gallery is created."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import META_EPOCH, META_FINGERPRINT, Entry, GalleryMeta
from app.faults import ModelMismatch

logger = logging.getLogger(__name__)


def mismatch_message(stored: str, loaded: str) -> str:
    return (
        f"the gallery's embeddings were made by weights with fingerprint {stored[:16]}…, but the loaded weights "
        f"have fingerprint {loaded[:16]}…: their templates are not comparable. Start with the weights the gallery "
        f"was enrolled with, or re-embed the gallery under the new ones: `reid-admin reembed` (python -m app.admin "
        f"reembed) with the same REID_* settings, then start the service again. Full fingerprints: stored {stored}, "
        f"loaded {loaded}"
    )


def stored_fingerprint(session: Session) -> str | None:
    return session.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT))


def epoch_of(session: Session) -> str | None:
    return session.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_EPOCH))


def bind(session: Session, fingerprint: str | None, dim: int) -> str:
    """Check (or, for a new gallery, record) the weights' fingerprint and the embeddings' size, and give the
    database an epoch if it has none; the epoch. Runs in a write transaction."""
    stored = session.get(GalleryMeta, META_FINGERPRINT)
    if fingerprint is None:
        pass
    elif stored is None:
        entries = session.scalar(select(func.count(Entry.id))) or 0
        if entries:
            logger.warning(
                "the gallery's %d entries have no model fingerprint (made before fingerprints were kept): "
                "binding them to the loaded weights %s",
                entries,
                fingerprint,
            )
        session.add(GalleryMeta(key=META_FINGERPRINT, value=fingerprint))
    elif stored.value != fingerprint:
        raise ModelMismatch(mismatch_message(stored.value, fingerprint))
    sample = session.scalar(select(Entry.embedding).limit(1))
    if sample is not None and len(sample) // 4 != dim:
        raise ValueError(
            f"the database holds {len(sample) // 4}-d embeddings but the model makes {dim}-d ones; "
            "use the weights the gallery was enrolled with, or a new data folder / database"
        )
    epoch = session.get(GalleryMeta, META_EPOCH)
    if epoch is None:
        epoch = GalleryMeta(key=META_EPOCH, value=uuid.uuid4().hex)
        session.add(epoch)
    else:
        # A write, so that a read-only database (file mode, a standby) stops start-up now with the driver's
        # reason, not at the first enrolment.
        session.execute(update(GalleryMeta).where(GalleryMeta.key == META_EPOCH).values(value=GalleryMeta.value))
    return epoch.value
