"""Atomic writes (nnsight_vla.files): the old file survives a failed write, nothing is left behind, and writers
that want a file name or pick a format by suffix get the right bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nnsight_vla import files


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "er" / "result.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"a": 2}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 2} and target.read_text().endswith("\n")
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_failed_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.csv"
    files.write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    with pytest.raises(TypeError):  # a value JSON cannot hold fails before anything is written
        files.write_json(target, {"x": object()})
    assert target.read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1


def test_name_based_writers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnsight_vla.reports.figures import save_figure as _save

    fig = plt.figure()
    try:
        png, pdf = _save(fig, tmp_path / "plot.png"), _save(fig, tmp_path / "plot.pdf")
    finally:
        plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    arrays = tmp_path / "arrays.npz"
    with files.atomic_path(arrays) as tmp, open(tmp, "wb") as fh:  # np.savez would append .npz to a name
        np.savez(fh, x=np.arange(3))
    np.testing.assert_array_equal(np.load(arrays)["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz", "plot.pdf", "plot.png"]
