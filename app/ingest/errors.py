"""The one error ``reid-admin ingest`` tells the operator about."""


class IngestError(Exception):
    """A problem the operator can fix, told in one sentence (no traceback)."""
