"""Randomized fault trials against saved runs and vector stores: nothing lost, left behind or wrong.

    python benchmarks/faults.py [--trials 300] [--seed 0]

One explainer ``A`` fitted with a vector store (``store=``) and saved, one ``M`` kept in memory with
larger arrays and saved, and these trials, drawn at random (seeded) in fixed shares:

* ``kill-save``: a forked child saves ``A`` or ``M`` over its run in a loop and gets SIGKILL at a
  random instant (uniform over 2.5 saves); the run must still load and answer as before, and the
  next save must leave no byte but the run's.
* ``kill-first-save``: the same, into a new folder; a later save there must work without
  ``overwrite`` (or replace the complete run the child managed to write) and leave nothing behind.
* ``kill-fit``: a forked child fits a new explainer into ``A``'s store folder and gets SIGKILL at a
  random instant of the fit; ``A`` and its saved run must answer as before, and the next fit into
  the folder must leave only the live explainers' generations.
* ``corrupt``: a copy of a saved run gets a random same-size edit (bit flips, a reversed block, NaN
  values, a zeroed block, two blocks swapped) at a random offset of a random file (arrays, a
  stored vector file, ``store.json``, the manifest); ``load`` must refuse it.
* ``alias``: another explainer is fitted into ``A``'s store folder (every tenth time by a forked
  process), then ``A`` is saved to a new folder; that run must answer as ``A``.
* ``full-disk``: writes fail with ENOSPC after a random number of bytes, while saving ``M`` over
  its run or while fitting into the store; the error must be a ``DiskFullError``, the previous run
  whole, and no byte left behind.

Counts (all must be 0): runs lost (a run that no longer loads), wrong answers served (a run or an
explainer that answers differently from the explainer that was saved), bytes left behind,
undetected corruptions, folders blocked (a save refused because of what a killed one left), errors
not ours (anything but the expected ActClustError). Prints a table and writes
``benchmarks/results/faults.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # no thread pools: the trials fork, and a forked pool can hang

import argparse
import errno
import gc
import json
import platform
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import actclust
from actclust import ActClustError, ActivationClustering, DiskFullError, InvalidSaveError
from actclust.store import generations, vectors

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = {"kill-save": 0.30, "kill-first-save": 0.10, "kill-fit": 0.13, "corrupt": 0.27, "alias": 0.10,
          "full-disk": 0.10}
COUNTS = ("runs_lost", "wrong_answers_served", "bytes_left_behind", "undetected_corruptions", "folders_blocked",
          "errors_not_ours")


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10)).eval()


def fit(model, x, **kw) -> ActivationClustering:
    return ActivationClustering(model, ["0", "2", "4"], n_clusters=8, batch_size=1024, progress=False, **kw).fit(x)


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_bytes(run: Path) -> int:
    m = json.loads((run / "manifest.json").read_text())
    names = {"manifest.json", m["arrays_file"], *(m.get("files") or {})}
    if m["state"].get("store"):
        names.add(m["state"]["store"]["dir"])
    return sum(tree_bytes(run / n) if (run / n).is_dir() else (run / n).stat().st_size for n in names)


def answers(ac, q) -> tuple:
    return ac.predict_proba(q), ac.similar(q, k=5, search="exact").indices


def same(a, b) -> bool:
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def child(work) -> int:
    """Fork; the child runs ``work()`` and exits (or is killed), without touching the parent's state."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return pid


def kill_after(pid: int, delay: float) -> bool:
    """SIGKILL ``pid`` after ``delay`` s; whether it was still running (it was killed, not done)."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
        time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


class Bench:
    def __init__(self, root: Path, seed: int):
        self.root, self.rng = root, np.random.default_rng(seed)
        self.x = np.random.default_rng(1).standard_normal((6000, 64)).astype(np.float32)
        self.q = np.random.default_rng(2).standard_normal((200, 64)).astype(np.float32)
        self.store = root / "vectors"
        self.a = fit(mlp(0), self.x, store=self.store)
        self.m = fit(mlp(1), np.concatenate([self.x, self.x[::-1]]))  # in memory: ~19 MB of arrays
        self.runs = {"A": root / "run-A", "M": root / "run-M"}
        self.est = {"A": self.a, "M": self.m}
        self.expected = {k: answers(e, self.q) for k, e in self.est.items()}
        for k, e in self.est.items():
            e.save(self.runs[k])
        # how long a forked child takes to save over the run, to save into a new folder and to fit:
        # the kill instants are drawn over these spans (and a little beyond, so some finish)
        self.save_s = {k: self._time(lambda k=k: self._in_child(lambda: self.est[k].save(self.runs[k], overwrite=True)))
                       for k in self.est}
        self.first_s = {k: self._time(lambda k=k: self._in_child(lambda: self.est[k].save(self.root / "timing")))
                        for k in self.est}
        self.fit_s = self._time(lambda: self._in_child(lambda: fit(mlp(4), self.x[:4000], store=self.store)))
        shutil.rmtree(self.root / "timing", ignore_errors=True)
        self.counts = {c: 0 for c in COUNTS}
        self.per_kind: dict = {}
        self.kills = {"killed": 0, "finished_before_kill": 0}
        self.errors: list = []  # what an "error not ours" was, for the JSON

    def _in_child(self, work) -> None:
        shutil.rmtree(self.root / "timing", ignore_errors=True)
        os.waitpid(child(work), 0)

    @staticmethod
    def _time(fn, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def count(self, kind: str, name: str, value: int = 1) -> None:
        if value:
            self.counts[name] += value
            self.per_kind.setdefault(kind, {c: 0 for c in COUNTS})[name] += value

    def check_run(self, kind: str, key: str, run: Path) -> None:
        """The run must load and answer as the explainer that was saved."""
        try:
            loaded = actclust.load(run, self.est[key].model, progress=False)
        except ActClustError:
            self.count(kind, "runs_lost")
            return
        if not same(answers(loaded, self.q), self.expected[key]):
            self.count(kind, "wrong_answers_served")

    def left_behind(self, kind: str, run: Path) -> None:
        self.count(kind, "bytes_left_behind", tree_bytes(run) - run_bytes(run))

    # ------------------------------------------------------------------ trials
    def kill_save(self, kind):
        key = "A" if self.rng.random() < 0.5 else "M"
        est, run = self.est[key], self.runs[key]

        def loop():
            while True:
                est.save(run, overwrite=True)

        pid = child(loop)
        self.kills["killed" if kill_after(pid, self.rng.uniform(0, 2.5 * self.save_s[key])) else
                   "finished_before_kill"] += 1
        self.check_run(kind, key, run)
        self.recover(kind, key, run)

    def recover(self, kind, key, run):
        try:
            self.est[key].save(run, overwrite=True)
        except ActClustError:
            self.count(kind, "folders_blocked")
            return
        self.left_behind(kind, run)
        self.check_run(kind, key, run)

    def kill_first_save(self, kind):
        key = "A" if self.rng.random() < 0.5 else "M"
        est, run = self.est[key], self.root / f"first-{self.rng.integers(1 << 62):x}"
        pid = child(lambda: est.save(run))
        self.kills["killed" if kill_after(pid, self.rng.uniform(0, 1.2 * self.first_s[key])) else
                   "finished_before_kill"] += 1
        complete = (run / "manifest.json").exists()
        try:
            est.save(run, overwrite=complete)
        except ActClustError:
            self.count(kind, "folders_blocked")
            return
        self.left_behind(kind, run)
        self.check_run(kind, key, run)
        shutil.rmtree(run)

    def kill_fit(self, kind):
        x = self.x[self.rng.permutation(len(self.x))[:4000]]
        pid = child(lambda: fit(mlp(4), x, store=self.store))
        self.kills["killed" if kill_after(pid, self.rng.uniform(0, 1.2 * self.fit_s)) else
                   "finished_before_kill"] += 1
        if not same(answers(self.a, self.q), self.expected["A"]):
            self.count(kind, "wrong_answers_served")
        self.check_run(kind, "A", self.runs["A"])
        c = fit(mlp(5), self.x[:1500], store=self.store)  # the next fit cleans up
        live = {self.a.state_.train_vectors.directory, c.state_.train_vectors.directory}
        self.count(kind, "bytes_left_behind", tree_bytes(self.store) - sum(tree_bytes(g) for g in live))
        if set(generations(self.store)) != live:
            self.count(kind, "bytes_left_behind", 1)  # a generation nobody holds survived
        del c
        gc.collect()

    def corrupt(self, kind):
        key = "A" if self.rng.random() < 0.5 else "M"
        copy = self.root / "corrupt"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.runs[key], copy)  # copies, not the store's hard links
        files = sorted(p for p in copy.rglob("*") if p.is_file() and p.stat().st_size > 0)
        target = files[self.rng.integers(len(files))]
        raw = bytearray(target.read_bytes())
        how = ["bits", "reverse", "nan", "zero", "swap"][self.rng.integers(5)]
        n, at = len(raw), int(self.rng.integers(len(raw)))
        block = max(1, min(256, n // 4))
        at = min(at, n - block)
        before = bytes(raw)
        if how == "bits":
            for bit in self.rng.choice(n * 8, int(self.rng.integers(1, 9)), replace=False):
                raw[bit // 8] ^= 1 << int(bit % 8)
        elif how == "reverse":
            raw[at:at + block] = raw[at:at + block][::-1]
        elif how == "nan":
            raw[at:at + 4] = np.array([np.nan], np.float32).tobytes()[:len(raw[at:at + 4])]
        elif how == "zero":
            raw[at:at + block] = bytes(len(raw[at:at + block]))
        else:
            other = int(self.rng.integers(max(1, n - block)))
            a, b = bytes(raw[at:at + block]), bytes(raw[other:other + block])
            raw[at:at + block], raw[other:other + block] = b[:len(a)], a[:len(b)]
        if bytes(raw) == before:
            return  # the edit changed nothing (a block equal to its reverse, zeros over zeros)
        self.per_kind.setdefault(kind, {c: 0 for c in COUNTS})
        with open(target, "r+b") as f:
            f.write(raw)
        try:
            loaded = actclust.load(copy, self.est[key].model, progress=False)
        except InvalidSaveError:
            return  # refused: as it must be
        except Exception as e:  # noqa: BLE001 - counted
            self.count(kind, "errors_not_ours")
            self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            return
        self.count(kind, "undetected_corruptions")
        if not same(answers(loaded, self.q), self.expected[key]):
            self.count(kind, "wrong_answers_served")

    def alias(self, kind):
        other = self.x[self.rng.permutation(len(self.x))[:3000]]
        if self.rng.random() < 0.1:  # another process
            pid = child(lambda: fit(mlp(6), other, store=self.store))
            os.waitpid(pid, 0)
        else:
            b = fit(mlp(6), other, store=self.store)
        run = self.root / "alias-run"
        shutil.rmtree(run, ignore_errors=True)
        self.a.save(run)
        loaded = actclust.load(run, self.a.model, progress=False)
        if not same(answers(loaded, self.q), self.expected["A"]) or not same(answers(self.a, self.q),
                                                                              self.expected["A"]):
            self.count(kind, "wrong_answers_served")
        b = None  # noqa: F841
        gc.collect()

    def full_disk(self, kind):
        budget = [int(self.rng.integers(0, 20_000_000))]
        real_write, real_open = os.write, open

        def write(fd, data):
            if len(data) > budget[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget[0] -= len(data)
            return real_write(fd, data)

        class Full:
            def __init__(self, path, mode, **kw):
                self._f, self.name = real_open(path, mode, **kw), str(path)

            def write(self, data):
                return write(self._f.fileno(), data)

            def __getattr__(self, name):
                return getattr(self._f, name)

        on_fit = self.rng.random() < 0.3
        before = tree_bytes(self.store) if on_fit else None
        os.write = write
        vectors.open = lambda path, mode="r", **kw: Full(path, mode, **kw) if "w" in mode else real_open(path, mode, **kw)
        try:
            if on_fit:
                fit(mlp(7), self.x[:3000], store=self.store)
            else:
                self.m.save(self.runs["M"], overwrite=True)
            raised = None
        except DiskFullError as e:
            raised = e
        except Exception as e:  # noqa: BLE001 - counted
            raised = e
            self.count(kind, "errors_not_ours")
            self.errors.append(f"{kind}: {type(e).__name__}: {e}")
        finally:
            os.write = real_write
            del vectors.open
        self.per_kind.setdefault(kind, {c: 0 for c in COUNTS})
        gc.collect()
        if on_fit:
            if raised is not None:  # nothing of the failed fit may stay
                self.count(kind, "bytes_left_behind", max(0, tree_bytes(self.store) - before))
        else:
            self.left_behind(kind, self.runs["M"])
            self.check_run(kind, "M", self.runs["M"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="actclust-faults-") as tmp:
        bench = Bench(Path(tmp), args.seed)
        kinds = list(SHARES)
        plan = bench.rng.choice(len(kinds), args.trials, p=np.array(list(SHARES.values())) / sum(SHARES.values()))
        done = {k: 0 for k in kinds}
        for i, j in enumerate(plan):
            kind = kinds[j]
            getattr(bench, kind.replace("-", "_"))(kind)
            done[kind] += 1
            if (i + 1) % 25 == 0:
                print(f"  {i + 1}/{args.trials} trials, {time.perf_counter() - t0:.0f} s", flush=True)
        result = {
            "command": f"python benchmarks/faults.py --trials {args.trials} --seed {args.seed}",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
            "trials": done, "counts": bench.counts, "per_kind": bench.per_kind, "kills": bench.kills,
            "errors_not_ours": bench.errors[:20],
            "seconds": round(time.perf_counter() - t0, 1),
            "sizes": {"run_A_bytes": run_bytes(bench.runs["A"]), "run_M_bytes": run_bytes(bench.runs["M"]),
                      "save_s": {k: round(v, 4) for k, v in bench.save_s.items()},
                      "first_save_s": {k: round(v, 4) for k, v in bench.first_s.items()}, "fit_s": round(bench.fit_s, 3)},
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'trial':<18}{'n':>5}  " + "  ".join(f"{c:>22}" for c in COUNTS))
    for kind in kinds:
        row = bench.per_kind.get(kind, {})
        print(f"{kind:<18}{done[kind]:>5}  " + "  ".join(f"{row.get(c, 0):>22}" for c in COUNTS))
    print(f"{'total':<18}{sum(done.values()):>5}  " + "  ".join(f"{bench.counts[c]:>22}" for c in COUNTS))
    print(f"\nkills: {bench.kills}; {result['seconds']} s; results in {RESULTS / 'faults.json'}")
    if any(bench.counts.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
