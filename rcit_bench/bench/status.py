"""`rcit-bench status`: where a sweep stands, from its files alone.

Why files only: it is asked while a sweep (or a SLURM job array) writes the same folders, often from a login
node without a GPU or the data. So it reads the result files, each (entry, seed)'s run state and its lock file
through :class:`RunStore` and :class:`RunLock`, and never loads a model or the data, nor takes a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcit_bench.bench import results as R
from rcit_bench.bench.spec import Spec, load_spec
from rcit_bench.bench.store import RunStore
from rcit_bench.data.datasets import PRETRAINED  # torch-free
from rcit_bench.errors import UserError
from rcit_bench.utils import format_table

__all__ = ["EntryStatus", "sweep_status", "format_status"]

#: a `pretrained` entry is never trained: "pretrained" until its first cell, then "evaluating" / "evaluated"
STATES = ("not started", "training", "trained", "evaluating", "pretrained", "evaluated")
REASON_CHARS = 160


@dataclass
class EntryStatus:
    """One (entry, seed) of a spec. ``pending`` counts the cells a rerun still evaluates that have not failed,
    the ``stale`` ones (a result of another configuration of the entry) included; ``done + failed + pending ==
    total``."""

    entry: str
    method: str
    seed: int
    state: str  # one of STATES
    total: int
    done: int
    failed: int
    stale: int
    pending: int
    first_failure: tuple[str, str] | None = None  # (cell id, reason), in evaluation order
    lock: str | None = None  # the live owner, as RunLock.describe() words it
    lock_owner: str | None = None  # ``host:pid`` of the live owner
    stale_lock: str | None = None  # why a lock left behind may be taken over (RunLock.stale_reason)

    @property
    def where(self) -> str:
        return f"{self.entry}/seed{self.seed}"


def sweep_status(spec: Spec | str | Path, results_dir: str | Path = "runs") -> list[EntryStatus]:
    """The status of every (entry, seed) of `spec` under `results_dir`, in spec order.

    A results directory that does not exist is a UserError (a wrong ``--results-dir``); a spec folder that does
    not exist yet is not (the sweep has not started): every entry is then "not started"."""
    if not Path(results_dir).is_dir():
        raise UserError(f"Results directory {str(results_dir)!r} does not exist; pass the --results-dir the bench "
                        f"used (default 'runs').")
    spec = spec if isinstance(spec, Spec) else load_spec(spec, check_devices=False)
    out = []
    for entry in spec.entries:
        ehash = spec.entry_hash(entry.id)
        cells = spec.cells(entry)
        for seed in spec.seeds:
            out.append(_entry_status(RunStore.of(results_dir, spec.name, entry.id, seed), entry.id, entry.method,
                                     seed, ehash, cells, untrained=entry.regime == PRETRAINED))
    return out


def _entry_status(store: RunStore, entry_id: str, method: str, seed: int, ehash: str,
                  cells: list[Any], untrained: bool = False) -> EntryStatus:
    done = failed = stale = 0
    first: tuple[str, str] | None = None
    for cell in cells:
        rec = R.read_result(store.cell_path(cell.id))
        if rec is None:
            continue
        if rec.get("entry_hash") != ehash:
            stale += 1
        elif rec.get("status") == "ok":
            done += 1
        else:
            failed += 1
            if first is None:
                first = (cell.id, str(rec.get("reason") or "(no reason recorded)"))
    trained = store.trained_checkpoint(ehash) is not None
    lock = store.lock
    owner = lock.owner()
    live = stale_lock = owner_id = None
    if owner is not None:
        stale_lock = lock.stale_reason(owner)
        if stale_lock is None:
            live = lock.describe(owner)
            owner_id = f"{owner.get('host', '?')}:{owner.get('pid', '?')}" if owner else "unknown"
    if untrained:  # loaded as published: nothing to train, only cells to evaluate
        word = "evaluating" if live is not None else ("evaluated" if done + failed else "pretrained")
    elif live is not None:
        word = "evaluating" if trained else "training"
    else:
        word = "trained" if trained else "not started"
    return EntryStatus(entry_id, method, seed, word, len(cells), done, failed, stale, len(cells) - done - failed,
                       first, live, owner_id, stale_lock)


def format_status(statuses: list[EntryStatus], spec_name: str, results_dir: str | Path) -> str:
    """A plain-text table, one row per (entry, seed), a totals line, then one line per entry with failures
    (its first reason), with a stale lock, or with stale results."""
    folder = Path(results_dir) / spec_name
    head = ("entry", "method", "seed", "state", "done", "failed", "pending", "stale", "lock")
    rows = [(s.entry, s.method, str(s.seed), s.state, f"{s.done}/{s.total}", str(s.failed), str(s.pending),
             str(s.stale), s.lock_owner or ("stale" if s.stale_lock else "")) for s in statuses]
    lines = [f"spec {spec_name!r}, results under {folder}"]
    if not folder.is_dir():
        lines.append(f"(no results yet: {folder} does not exist; the sweep has not started, or it writes to another "
                     "--results-dir)")
    lines += format_table([head, *rows], right={2, 4, 5, 6, 7})  # the numbers right-aligned
    total = sum(s.total for s in statuses)
    done, failed = sum(s.done for s in statuses), sum(s.failed for s in statuses)
    pending, stale = sum(s.pending for s in statuses), sum(s.stale for s in statuses)
    summary = f"{done}/{total} cells done, {failed} failed, {pending} pending"
    if stale:
        summary += f" ({stale} of them stale: results of another configuration, redone by the next bench run)"
    running = [s.lock_owner for s in statuses if s.lock_owner]
    if running:  # one run holds the locks of all the entries it trains before it evaluates them
        owners = ", ".join(dict.fromkeys(running))
        summary += f"; {len(running)} {'entry' if len(running) == 1 else 'entries'} running ({owners})"
    lines.append(summary)
    for s in statuses:
        if s.first_failure:
            cell, reason = s.first_failure
            text = f"{s.where}: {s.failed} failed, first {cell}: {' '.join(reason.split())}"
            lines.append(text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "...")
        if s.stale_lock:
            lines.append(f"{s.where}: lock left behind, taken over by the next bench run: {s.stale_lock}")
    return "\n".join(lines) + "\n"
