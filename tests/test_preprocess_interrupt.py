"""Interrupted runs: a failure, Ctrl-C/SIGTERM, SIGKILL or a dead worker never leave anything under the
final names (.bin, .idx, .meta.json), and a handled stop also removes its temporary files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.errors import DataError
from data_tools.preprocess import PreprocessOptions, preprocess

pytestmark = pytest.mark.slow  # end-to-end runs of real processes; `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "run" / "demo" / "corpus" / "austen-chapters.jsonl"
FINAL = ("out.bin", "out.idx", "out.meta.json")


def _corpus_copies(tmp_path, copies):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(copies):
        shutil.copy(CORPUS, folder / f"part{i}.jsonl")
    return folder


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def _size(path) -> int:
    """A shard's size, 0 if it was renamed (its temporary name finished) between the listing and now."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_for_tokens(tmp_path, process, timeout=120.0):
    """Wait until a shard has tokens on disk: the run is in the middle of its work."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if any(_size(f) for d in tmp_path.glob("out.tmp-*") for f in d.glob("unit-*.bin*")):
            return
        time.sleep(0.05)
    raise AssertionError("the run never started writing")


def _start_cli(tmp_path, inputs, *extra):
    command = [sys.executable, "-m", "data_tools.preprocess", "-i", str(inputs), "-o", str(tmp_path / "out"),
               "--tokenizer", "bert-base-uncased", "--no-progress", *extra]  # fmt: skip
    env = os.environ | {"RAYON_NUM_THREADS": "1"}  # slow enough to be stopped in the middle on any machine
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_late_failure_leaves_nothing(tmp_path):
    folder = _corpus_copies(tmp_path, 1)
    with open(folder / "zz.jsonl", "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"zz\.jsonl:2: malformed JSON"):
        preprocess(
            PreprocessOptions([str(folder)], str(tmp_path / "out"), "bert-base-uncased", progress=False)
        )
    assert _outputs(tmp_path) == []


def test_a_worker_error_fails_the_run_with_its_message(tmp_path):
    folder = _corpus_copies(tmp_path, 1)
    lines = (folder / "part0.jsonl").read_text().splitlines()
    lines[200] = '{"title": "no text here"}'
    (folder / "part0.jsonl").write_text("\n".join(lines) + "\n")
    options = PreprocessOptions([str(folder)], str(tmp_path / "out"), "bert-base-uncased", workers=2,
                                min_unit_bytes=256 << 10, progress=False)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(DataError, match=r"part0\.jsonl:201: missing key 'text'"):
        preprocess(options)
    assert time.monotonic() - started < 60
    assert _outputs(tmp_path) == []


def test_sigterm_stops_cleanly(tmp_path):
    process = _start_cli(tmp_path, _corpus_copies(tmp_path, 3))
    _wait_for_tokens(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted; no output was written" in err
    assert _outputs(tmp_path) == []


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_leaves_no_final_files_and_no_orphans(tmp_path):
    process = _start_cli(tmp_path, _corpus_copies(tmp_path, 5), "--workers", "2")
    _wait_for_tokens(tmp_path, process)
    workers = _worker_pids(process.pid)
    assert len(workers) == 2
    process.kill()
    process.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)  # workers stop once their parent is gone
    assert not set(FINAL) & set(_outputs(tmp_path))
    assert all(name.startswith("out.tmp-") for name in _outputs(tmp_path))  # only the temporary folder


def _worker_pids(parent):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def test_a_killed_worker_fails_the_run(tmp_path):
    process = _start_cli(tmp_path, _corpus_copies(tmp_path, 5), "--workers", "2")
    _wait_for_tokens(tmp_path, process)
    workers = _worker_pids(process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "was killed by SIGKILL" in err and "out of memory" in err
    assert _outputs(tmp_path) == []
