"""io.atomic (one atomic-write helper), io.tensorfile (our safetensors writer) and load's verify pass."""

import errno
import hashlib
import os
import stat

import numpy as np
import pytest

import actclust
from actclust import DiskFullError, StorageError, StoragePermissionError
from actclust.io import atomic
from actclust.io.tensorfile import DTYPES, write_arrays


# what we write in safetensors format, the safetensors package reads back: every dtype, 0-d, empty,
# big-endian and strided arrays
def test_tensorfile_round_trip(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {f"a/{d}": (rng.standard_normal((3, 4)) * 10).astype(d) for d in DTYPES}
    arrays.update(scalar=np.float64(3.5), empty=np.zeros((0, 5), np.float32),
                  big_endian=np.arange(6, dtype=">i4").reshape(2, 3),
                  strided=np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2])
    digest = atomic.write_into(tmp_path / "a.safetensors", lambda write: write_arrays(arrays, write))
    assert digest == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
    back = load_file(str(tmp_path / "a.safetensors"))
    for k, v in arrays.items():
        v = np.asarray(v)
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    with pytest.raises(actclust.ParameterError, match=r"Cannot save array 'c' of dtype complex128"):
        write_arrays({"c": np.zeros(2, complex)}, lambda b: None)


# a write replaces the file whole, with the user's permissions, and leaves no temporary entry
def test_write_is_atomic_and_clean(tmp_path):
    target = tmp_path / "page.html"
    atomic.write(target, "one")
    atomic.write(target, b"two")
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["page.html"]
    assert stat.S_IMODE(target.stat().st_mode) == atomic.file_mode()

    def fails(write):
        write(b"half of it")
        raise RuntimeError("the renderer broke")

    with pytest.raises(RuntimeError, match="the renderer broke"):
        atomic.write(target, fails)
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["page.html"]


# clean-up removes a killed writer's entries (nobody holds them) and only those: a live writer's
# entry (held, here by this process) and files that merely look alike stay
def test_clean_removes_only_dead_entries_of_ours(tmp_path):
    dead = atomic.temp_path(tmp_path, "report.html")
    dead.write_bytes(b"x" * 1000)
    live, hold = atomic.make_temp_dir(tmp_path, "save")
    (live / "arrays").write_bytes(b"y" * 10)
    lookalikes = [tmp_path / ".tmpAbC123", tmp_path / ".report.html.tmp", tmp_path / "notes.actclust-tmp"]
    for f in lookalikes:
        f.write_text("not ours")
    assert atomic.clean(tmp_path) == 1000
    assert not dead.exists() and (live / "arrays").exists() and all(f.exists() for f in lookalikes)
    hold.release()
    assert atomic.clean(tmp_path) == 10 and not live.exists()


# an entry named like ours that is not a file or folder of ours (a FIFO, a link) is left alone: opening the FIFO to
# test its lock waited for a writer forever, so a save with --overwrite (or study analyze --html) hung with the
# folder's lock held; the link was followed and whatever it named opened (found by an outside security check)
def test_clean_leaves_fifos_and_links_named_like_ours(fitted, tmp_path):
    import threading

    outside = tmp_path / "outside.txt"
    outside.write_text("someone's file")
    run = tmp_path / "run"
    fitted.save(run)
    fifo, link = atomic.temp_path(run, "save"), atomic.temp_path(run, "report.html")
    os.mkfifo(fifo)
    link.symlink_to(outside)
    done = []
    worker = threading.Thread(target=lambda: done.append((atomic.clean(run), fitted.save(run, overwrite=True))),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert done and done[0][0] == 0, "clean() or the save hung on a FIFO named like a temporary entry"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and outside.read_text() == "someone's file"
    assert actclust.load(run, fitted.model, progress=False).n_clusters == fitted.n_clusters


# an interrupt in a hold's set-up never leaves its folder locked: it came between the lock and the descriptor's
# finalizer, the locked descriptor leaked, and the next save into the folder waited for it forever (found by an
# outside check that interrupted a save at each of its steps); the lock is now taken last
def test_interrupted_hold_leaves_no_lock(tmp_path, monkeypatch):
    import weakref

    real = weakref.finalize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.weakref, "finalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.Hold(tmp_path)
    monkeypatch.setattr(atomic.weakref, "finalize", real)
    atomic.Hold(tmp_path, wait=False).release()  # taken at once (BlockingIOError while the leaked lock stood)


# the report writer removes a leftover of an earlier, killed write of the same report
# a failed write into a folder that did not exist leaves no empty folders: those the block made go, deepest first,
# while empty; one that held something, or that was there before, stays
def test_folder_removes_what_it_made_on_failure(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.folder(tmp_path / "a" / "b" / "c") as made:
            assert made.path.is_dir()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="full"):
        with atomic.folder(tmp_path / "a" / "b"):
            (tmp_path / "a" / "note.txt").write_text("someone else's")
            raise OSError(errno.ENOSPC, "full")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["note.txt"]
    with atomic.folder(tmp_path / "ok") as made:
        (made.path / "f").write_text("x")
    assert (tmp_path / "ok" / "f").exists()


def test_report_write_removes_killed_leftover(fitted, data, tmp_path):
    leftover = atomic.temp_path(tmp_path, "report.html")
    leftover.write_text("half a report")
    actclust.report(fitted, data[0][:20], data[1][:20], out=tmp_path / "report.html", n_correct=1, n_wrong=1)
    assert sorted(os.listdir(tmp_path)) == ["report.html"]


# OSErrors become ActClustErrors that derive from the built-in a user expects and say what to do
@pytest.mark.parametrize("code, cls, match", [
    (errno.ENOSPC, DiskFullError, r"the disk is full \(boom\).*free space on that disk"),
    (errno.EDQUOT, DiskFullError, r"the disk is full"),
    (errno.EACCES, StoragePermissionError, r"choose a folder you may write to"),
    (errno.EROFS, StoragePermissionError, r"choose a folder you may write to"),
    (errno.ENOENT, StorageError, r"check that the folder exists"),
    (errno.EIO, StorageError, r"check the disk and the path"),
])
def test_storage_errors(code, cls, match):
    with pytest.raises(cls, match=r"Could not write the thing /x/y: .*" + match) as info:
        with atomic.guard("write the thing", "/x/y"):
            raise OSError(code, "boom")
    assert isinstance(info.value, OSError) and info.value.errno == code
    assert isinstance(info.value, PermissionError) == (cls is StoragePermissionError)


# verify reads every file once; a progress bar shows for stores above VERIFY_BAR_BYTES
def test_verify_progress_bar(model, data, tmp_path, monkeypatch, capsys):
    from actclust.io import persistence

    x, y = data
    actclust.ActivationClustering(model, ["conv", "fc1"], n_clusters=3, progress=False,
                                  store=tmp_path / "v").fit(x, y).save(tmp_path / "run")
    actclust.load(tmp_path / "run", model)
    assert "verifying the run's files" not in capsys.readouterr().err
    monkeypatch.setattr(persistence, "VERIFY_BAR_BYTES", 0)
    read = []
    real = atomic.sha256_file
    monkeypatch.setattr(atomic, "sha256_file", lambda path, *a, **k: read.append(path.name) or real(path, *a, **k))
    actclust.load(tmp_path / "run", model)
    assert "verifying the run's files" in capsys.readouterr().err
    assert sorted(read) == sorted({p.name for p in (tmp_path / "run").rglob("*") if p.is_file()} - {"manifest.json"})
    read.clear()
    actclust.load(tmp_path / "run", model, verify=False)
    assert read == []


# a mkdir failing part way (a name too long below new parents, a disk out of inodes) leaves none of the parents it made
def test_folder_removes_parents_of_a_failed_mkdir(tmp_path):
    with pytest.raises(OSError, match="too long"):
        with atomic.folder(tmp_path / "a" / "b" / ("x" * 300)):
            pass
    assert list(tmp_path.iterdir()) == []


# a save that waited for the lock of a folder another save made, and removed on failing, saves into the folder made
# again (it failed: "No such file or directory", an outside check)
def test_save_waiting_on_a_failed_save(fitted, model, data, tmp_path):
    import threading
    import time

    path, results = tmp_path / "new" / "run", []

    def save():
        try:
            fitted.save(path)
            results.append("saved")
        except BaseException as e:  # noqa: BLE001 - reported below
            results.append(e)

    waiting = threading.Thread(target=save)
    with pytest.raises(KeyboardInterrupt):
        with atomic.folder(path) as made:
            turn = atomic.hold_folder(path)
            waiting.start()
            time.sleep(1.0)  # the other save waits for the lock
            made.remove()
            turn.release()
            raise KeyboardInterrupt
    waiting.join(60)
    assert results == ["saved"]
    np.testing.assert_array_equal(actclust.load(path, model, progress=False).predict(data[0]), fitted.predict(data[0]))


# a name too long for the file system among the folders still to make is said before the work (the demo trained first,
# then failed to save)
def test_check_can_write_names_too_long(tmp_path):
    with pytest.raises(StorageError, match=r"Could not save the run to .*xxxx/run: File name too long"):
        atomic.check_can_write(tmp_path / "new" / ("x" * 300) / "run", "save the run to")
    atomic.check_can_write(tmp_path / "new" / ("x" * 200) / "run", "save the run to")
    assert list(tmp_path.iterdir()) == []


# without replace, a file that appeared at the target is left as it is: linked into place (which fails where a file
# exists), or on a file system without hard links, checked, then renamed (a report replaced a user's new notes: an
# outside check)
@pytest.mark.parametrize("links", [True, False])
def test_write_without_replace_keeps_a_file_made_meanwhile(tmp_path, monkeypatch, links):
    from actclust.exceptions import RunExistsError

    if not links:
        def no_links(*args, **kwargs):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "page.html"
    atomic.write(target, b"new", replace=False)
    assert target.read_bytes() == b"new"
    target.write_bytes(b"mine")
    with pytest.raises(RunExistsError, match=r"page.html appeared while the file was being written, and is left as it "
                                             r"is; pass overwrite=True \(--overwrite\)"):
        atomic.write(target, b"newer", replace=False)
    assert target.read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["page.html"]
    atomic.write(target, b"newer")  # replace: as before
    assert target.read_bytes() == b"newer"
