"""The transit table (app.transit): the least time anyone takes between two cameras; sightings at both closer in
time than that are two people (online and in re-grouping: tests/app/test_regroup.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from app.transit import Span, TransitTable

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "transit.csv"
    path.write_text(text)
    return path


def test_the_table_reads_both_ways_and_names_the_line_it_cannot_use(tmp_path: Path) -> None:
    transit = TransitTable.load(table(tmp_path, "camera_a,camera_b,min_seconds\nc1,c2,120\n\nc2,c3,30.5\n"))
    assert transit.least_from("c2") == {"c1": timedelta(seconds=120), "c3": timedelta(seconds=30.5)}
    seen = Span("c1", T0, T0 + timedelta(seconds=10))
    assert transit.too_soon(seen, Span("c2", T0 + timedelta(seconds=129), T0 + timedelta(seconds=140)))
    assert not transit.too_soon(seen, Span("c2", T0 + timedelta(seconds=130), T0 + timedelta(seconds=140)))
    assert not transit.too_soon(seen, Span("c3", T0, T0))  # no row for c1 and c3: not constrained
    assert not transit.too_soon(seen, Span("c1", T0, T0))  # one camera: the tracks' own rules
    for text, said in [
        ("a,b,seconds\nc1,c2,1\n", "the first line must be camera_a,camera_b,min_seconds"),
        ("camera_a,camera_b,min_seconds\nc1,c2,1\nc1,c2\n", "line 3: expected 3 values"),
        ("camera_a,camera_b,min_seconds\nc1,c1,5\n", "line 2: two different cameras needed"),
        ("camera_a,camera_b,min_seconds\nc1,c2,soon\n", "line 2: min_seconds must be a number >= 0"),
        ("camera_a,camera_b,min_seconds\nc1,c2,-1\n", "line 2: min_seconds must be a number >= 0"),
        ("camera_a,camera_b,min_seconds\nc1,c2,1\nc2,c1,2\n", "line 3: the pair c2,c1 is given twice"),
    ]:
        with pytest.raises(ValueError, match=said):
            TransitTable.load(table(tmp_path, text))


def test_conflicts_are_every_pair_too_soon_and_no_other() -> None:
    rng = np.random.default_rng(0)
    transit = TransitTable({("c1", "c2"): timedelta(seconds=60), ("c2", "c1"): timedelta(seconds=60)})
    spans = []
    for _ in range(300):
        start = T0 + timedelta(seconds=float(rng.uniform(0, 3600)))
        spans.append(
            Span(str(rng.choice(["c1", "c2", "c3"])), start, start + timedelta(seconds=float(rng.uniform(0, 90))))
        )
    expected = {
        (i, j) for i in range(len(spans)) for j in range(i + 1, len(spans)) if transit.too_soon(spans[i], spans[j])
    }
    assert expected and set(transit.conflicts(spans)) == expected
