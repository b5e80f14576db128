"""The bench scripts at their smallest sizes: each prints a table and appends it, with the machine, to the results
file. No figure is checked: timings on a shared machine mean nothing in a test."""

from __future__ import annotations

from pathlib import Path

from bench import index, networks


def test_index_bench_appends_its_tables_with_the_machine_and_command(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--sizes", "500", "--queries", "20", "--single-queries", "5", "--repeats", "1", "--results", str(results)]
    assert index.main(argv) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "## Gallery search, " in text
    assert f"Command: `python -m bench.index {' '.join(argv)}`" in text
    for row in ("| 500 | flat |", "| 500 | IVF22 nprobe 16 |", "| 500 | HNSW32 efSearch 64 |", "| 500 | Flat |"):
        assert row in text
    assert "- cpu: " in text and "- versions: " in text


def test_networks_bench_reports_cuda_rows_or_figures_and_appends_nothing_when_asked(tmp_path: Path, capsys) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--net", "mask", "--unet-width", "4", "--unet-levels", "3", "--input-size", "32x16", "--batches", "2"]
    argv += ["--skip", "compile,onnx", "--rounds", "1", "--min-rounds", "1", "--results", str(results), "--no-append"]
    assert networks.main(argv) == 0
    assert not results.exists()
    out = capsys.readouterr().out
    assert "| eager fp32 | 2 |" in out
    assert "| channels_last fp32 | 2 |" in out
    assert "autocast bf16 + CUDA graph" in out
