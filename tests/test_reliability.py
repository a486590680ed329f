"""benchmarks/reliability.py's machinery with small counts (the figures come from a full run)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reliability  # noqa: E402


def test_the_checks_can_fail(tmp_path):
    assert reliability.one_line_refusal(reliability.invoke("--help")) is not None
    refused = reliability.invoke("info", tmp_path / "nothing")
    assert reliability.one_line_refusal(refused, "not a fact database") is None
    assert reliability.one_line_refusal(refused, "some other message") is not None
    rows = [{"id": 0, "subject": "A"}, {"id": 1, "subject": "B"}]
    assert reliability.signature(rows, {0, 1}) != reliability.signature(rows[:1], {0, 1})


def test_a_small_run_passes_and_reports_every_category(tmp_path):
    out = tmp_path / "results" / "reliability"
    args = reliability.parse(["--kill-trials", "3", "--malformed", "2", "--writers", "1",
                              "--hostile", "2", "--disk-full", "1", "--work", str(tmp_path),
                              "--out", str(out)])
    report = reliability.run(args)
    categories = report["categories"]
    assert [row["failures"] for row in categories.values() if row["failed"]] == []
    assert categories["malformed input"]["trials"] == 2
    assert categories["two writers"]["trials"] == 1
    assert categories["hostile directory"]["trials"] == 4
    kills = [name for name in categories if name.startswith("kill -9")]
    assert sorted(kills) == sorted(f"kill -9: {k}" for k in reliability.KILL_KINDS[:3])
    disk = categories["disk full"]
    assert disk["trials"] == 1 or disk["skipped"]  # a machine that cannot mount says why
    assert json.loads(out.with_suffix(".json").read_text()) == report
    assert "| malformed input | 2 | 2 | 0 |" in out.with_suffix(".md").read_text()


def test_hdf5s_disk_full_while_closing_a_file_is_the_disk_full_error():
    """On a full tmpfs, HDF5 fails to flush a new segment when the file is closed and says
    so in a RuntimeError, the errno only in its text: one line, not a traceback."""
    from ndb.errors import DiskFullError, environment_error

    closing = RuntimeError(
        "Disable slist on flush dest failure failed (file write failed: time = Sat Nov 28 "
        "20:49:09 2026\n, filename = 'db/segments/.seg-00000003-0000.h5.ualx64rq.tmp', file "
        "descriptor = 6, errno = 28, error message = 'No space left on device', buf = "
        "0x55c3b1c3d840, total write size = 4096, bytes this sub-write = 4096, offset = 6144)")
    assert isinstance(environment_error(closing), DiskFullError)
    assert environment_error(RuntimeError("a bug, errno unknown")) is None
