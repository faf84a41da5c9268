"""Leaderboard: merge a spec's per-cell result files into markdown tables, a CSV and plots.

The leaderboard is built from the result files alone (never from memory of a run), so it can be
rebuilt at any time with ``rcit-bench leaderboard SPEC`` and always matches what is on disk. Numbers
the papers report come from :mod:`rcit_bench.bench.reference` and sit in their own, marked table.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rcit_bench.bench.reference import REPORTED, REPORTED_NOISE
from rcit_bench.bench.results import ResultRow, iter_results
from rcit_bench.errors import UserError
from rcit_bench.bench.spec import Entry, Spec, cell_id, config_path, entry_family, load_spec, method_class
from rcit_bench.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
CSV_METRICS = RECALLS + ("rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "accuracy", "centre_accuracy",
                         "random_accuracy")
#: main-table summary columns -> higher is better
SUMMARY_DIRECTION = {"mean_corrupted_rsum": True, "relative_robustness": True, "mmi": False, "mce": False}


@dataclass
class EntrySeed:
    """All ok cells of one (entry, seed): cell id -> result row."""

    cells: dict[str, ResultRow] = field(default_factory=dict)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _fmt(values: Sequence[float] | None, digits: int = 1) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _bold_best(table: list[list[str]], values: list[list[float | None]], higher: list[bool | None]) -> None:
    """Bold, in place, the best mean of each column (None direction = not ranked)."""
    for j, hib in enumerate(higher):
        if hib is None:
            continue
        col = [(row[j], i) for i, row in enumerate(values) if row[j] is not None and not math.isnan(row[j])]
        if len(col) < 2:
            continue
        best = max(v for v, _ in col) if hib else min(v for v, _ in col)
        for v, i in col:
            if abs(v - best) < 1e-9:
                table[i][j] = f"**{table[i][j]}**"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Board:
    """Result rows of one spec grouped by entry and seed, with the summaries computed per seed."""

    def __init__(self, spec: Spec, rows: list[ResultRow], include_stale: bool = False):
        self.spec = spec
        valid_cells = {e.id: {c.id for c in spec.cells(e)} for e in spec.entries}
        rows = [r for r in rows if r.entry in valid_cells and r.cell in valid_cells[r.entry]]
        current = {e.id: spec.entry_hash(e.id) for e in spec.entries}
        #: rows of another configuration of the entry (the spec or its config changed since they were made)
        self.stale = [r for r in rows if r.record.get("entry_hash") != current[r.entry]]
        self.include_stale = include_stale
        self.rows = rows if include_stale else [r for r in rows if r.record.get("entry_hash") == current[r.entry]]
        self.stale_entries = {r.entry for r in self.stale} if include_stale else set()
        self.ok: dict[str, dict[int, EntrySeed]] = defaultdict(dict)
        self.failed: dict[str, list[ResultRow]] = defaultdict(list)
        for r in self.rows:
            if r.status == "ok":
                self.ok[r.entry].setdefault(r.seed, EntrySeed()).cells[r.cell] = r
            else:
                self.failed[r.entry].append(r)
        ic = spec.evaluation.get("imagenet_c") or {}
        self.ic_corruptions: list[str] = list(ic.get("corruptions", []))
        self.ic_severities: list[int] = list(ic.get("severities", []))

    # -- per seed summaries
    def ic_rsums(self, entry: str, seed: int) -> dict[str, list[float]] | None:
        """corruption -> rsums over the spec's severities, or None when a cell is missing."""
        es = self.ok.get(entry, {}).get(seed)
        if es is None or not self.ic_corruptions:
            return None
        out = {}
        for name in self.ic_corruptions:
            vals = []
            for s in self.ic_severities:
                r = es.cells.get(_ic(name, s))
                if r is None:
                    return None
                vals.append(r.metrics["rsum"])
            out[name] = vals
        return out

    def summaries(self, entry: str, seed: int) -> dict[str, float]:
        """mean corrupted rsum, relative robustness, MMI (ImageNet-C grid) and mCE vs the baseline."""
        from rcit_bench.metrics import mce, mmi, relative_robustness

        out: dict[str, float] = {}
        es = self.ok.get(entry, {}).get(seed)
        grid = self.ic_rsums(entry, seed)
        if es is None or grid is None:
            return out
        flat = [v for vals in grid.values() for v in vals]
        out["mean_corrupted_rsum"] = sum(flat) / len(flat)
        clean = es.cells.get("clean")
        if clean is not None and clean.metrics.get("rsum", 0) > 0:
            out["relative_robustness"] = relative_robustness(clean.metrics["rsum"], flat)
            out["mmi"] = mmi(clean.metrics["rsum"], flat)
        base = self.spec.baseline
        if base is not None:
            bgrid = self.ic_rsums(base, seed)
            if bgrid is None:  # baseline lacks this seed: compare with its first complete seed
                bgrid = next((g for s in sorted(self.ok.get(base, {})) if (g := self.ic_rsums(base, s))), None)
            if bgrid is not None:
                try:
                    out["mce"] = mce(grid, bgrid)
                except ValueError as err:
                    log.warning("mCE of %s seed %d undefined: %s", entry, seed, err)
        return out

    def per_seed(self, entry: str, fn: Callable[[EntrySeed, int], float | None]) -> list[float]:
        vals = []
        for seed, es in sorted(self.ok.get(entry, {}).items()):
            v = fn(es, seed)
            if v is not None:
                vals.append(float(v))
        return vals

    def cell_metric(self, entry: str, cell: str, key: str = "rsum") -> list[float]:
        return self.per_seed(entry, lambda es, s: es.cells[cell].metrics.get(key) if cell in es.cells else None)


# ----------------------------------------------------------------------------------------------------------
# uncertainty: image-level cluster bootstrap from the stored per-query ranks

#: A cell is flagged when more than this fraction of its queries (in either direction) tied at their positive.
TIE_FLAG_FRACTION = 0.01
TIE_MARK = "‡"
UNCHANGED_MARK = "°"
CAP_MARK = "⚠"


class Resampler:
    """Per-resample metric values of every stored cell, all drawn with the SAME resampled test images (one
    multiplicity matrix per test-set size and seed 0), so any mean over cells or seeds and any difference of two
    entries is a paired bootstrap: it reflects which test images were sampled, nothing else."""

    def __init__(self, board: Board, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> None:
        self.board, self.n, self.confidence, self.seed = board, n_resamples, confidence, seed
        self._samples: dict[Path, dict[str, Any] | None] = {}

    def samples(self, row: ResultRow) -> dict[str, Any] | None:
        """metric key -> (n_resamples,) values of one result row, None without a ranks file."""
        from rcit_bench.metrics import bootstrap_samples

        if row.path not in self._samples:
            ranks = row.ranks()
            if ranks is None:
                self._samples[row.path] = None
            else:
                import torch

                self._samples[row.path] = bootstrap_samples(
                    torch.from_numpy(ranks["i2t"]), torch.from_numpy(ranks["t2i"]),
                    torch.from_numpy(ranks["caption_to_image"]), n_resamples=self.n, seed=self.seed)
        return self._samples[row.path]

    def _seed_values(self, entry: str, seed: int, cells: Sequence[str], key: str) -> tuple[float, Any] | None:
        es = self.board.ok.get(entry, {}).get(seed)
        if es is None or any(c not in es.cells for c in cells):
            return None
        points, draws = [], []
        for c in cells:
            smp = self.samples(es.cells[c])
            if smp is None or key not in smp:
                return None
            points.append(es.cells[c].metrics[key])
            draws.append(smp[key])
        import torch

        return sum(points) / len(points), torch.stack(draws).mean(0)

    def values(self, entry: str, cells: Sequence[str], key: str = "rsum",
               seeds: Sequence[int] | None = None) -> tuple[float, Any] | None:
        """(point, per-resample values) of `key` averaged over `cells` and over the entry's seeds."""
        seeds = sorted(self.board.ok.get(entry, {})) if seeds is None else list(seeds)
        got = [v for s in seeds if (v := self._seed_values(entry, s, cells, key)) is not None]
        if not seeds or len(got) != len(seeds):
            return None
        import torch

        return sum(p for p, _ in got) / len(got), torch.stack([d for _, d in got]).mean(0)

    def _bounds(self, draws: Any) -> tuple[float, float]:
        import torch

        alpha = (1.0 - self.confidence) / 2
        q = torch.quantile(draws.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
        return float(q[0]), float(q[1])

    def interval(self, entry: str, cells: Sequence[str], key: str = "rsum") -> tuple[float, float, float] | None:
        """(point, lo, hi): the percentile interval of `key` averaged over `cells` (and seeds)."""
        v = self.values(entry, cells, key)
        return None if v is None else (v[0], *self._bounds(v[1]))

    def paired(self, a: str, b: str, cells: Sequence[str], key: str = "rsum") -> tuple[float, float, float] | None:
        """(a - b, lo, hi) over the seeds both entries have, on the same resampled images."""
        seeds = sorted(set(self.board.ok.get(a, {})) & set(self.board.ok.get(b, {})))
        va, vb = self.values(a, cells, key, seeds), self.values(b, cells, key, seeds)
        if va is None or vb is None:
            return None
        return (va[0] - vb[0], *self._bounds(va[1] - vb[1]))


def _ci(point: float, lo: float, hi: float, digits: int = 1) -> str:
    return f"{point:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def tie_fraction(row: ResultRow) -> float | None:
    """The larger of the i2t and t2i fractions of queries tied at their positive, None when not recorded."""
    t = row.record.get("ties")
    if not t:
        return None
    return max(t["i2t"] / max(1, t["i2t_queries"]), t["t2i"] / max(1, t["t2i_queries"]))


def _cell_marks(board: Board, entry: str, cells: Sequence[str]) -> str:
    """Marks for a table value built from `cells`: ties above 1% of queries, images that barely changed."""
    rows = [es.cells[c] for es in board.ok.get(entry, {}).values() for c in cells if c in es.cells]
    marks = ""
    if any((tie_fraction(r) or 0.0) > TIE_FLAG_FRACTION for r in rows):
        marks += TIE_MARK
    if any((r.record.get("image_change") or {}).get("barely_changed") for r in rows):
        marks += UNCHANGED_MARK
    return marks


def _rsum_with_ci(board: Board, rs: Resampler, entry: str, cells: Sequence[str]) -> tuple[str, float | None]:
    """'RSUM [lo, hi]' (mean ± std over seeds first when several), with the cell marks; and the mean."""
    v = board.per_seed(entry, lambda es, s: (sum(es.cells[c].metrics["rsum"] for c in cells) / len(cells)
                                             if all(c in es.cells for c in cells) else None))
    if not v:
        return "-", None
    ci = rs.interval(entry, cells)
    text = _fmt(v) + (f" [{ci[1]:.1f}, {ci[2]:.1f}]" if ci else "")
    return text + _cell_marks(board, entry, cells), _mean_std(v)[0]


def training_rows(board: Board) -> list[tuple[str, int, dict[str, Any]]]:
    """(entry, seed, training section) of every trained (entry, seed) with results."""
    out = []
    for e in board.spec.entries:
        for seed, es in sorted(board.ok.get(e.id, {}).items()):
            tr = next((r.record.get("training") for r in es.cells.values() if r.record.get("training")), None)
            if tr and tr.get("trained", True):  # a pretrained entry's section says it was not trained
                out.append((e.id, seed, tr))
    return out


def pretrained_entries(board: Board) -> list[tuple[str, str]]:
    """(entry, model id) of the entries with results that were loaded as published, never trained."""
    out = []
    for e in board.spec.entries:
        for es in board.ok.get(e.id, {}).values():
            tr = next((r.record.get("training") for r in es.cells.values() if r.record.get("training")), None)
            if tr and tr.get("trained") is False:
                out.append((e.id, str(tr.get("pretrained") or "?")))
                break
    return out


def capped_while_improving(board: Board) -> list[str]:
    """'entry (seed k, +gain RSUM at its last validation)' for the entries that hit the cap while improving."""
    return [f"`{e}` (seed {s}, +{tr['last_gain']:.1f} val RSUM at its last validation)"
            for e, s, tr in training_rows(board) if tr.get("still_improving")]


def budget_table(board: Board) -> str:
    """What each model was trained with: the same rule for all, and whether it plateaued or hit the cap."""
    header = ["entry", "seed", "epochs", "optimizer steps", "pairs seen", "images encoded", "best val epoch", "best val RSUM", "stopped by", "modality clf. acc. (val)", "config"]
    rows = []
    for eid, seed, tr in training_rows(board):
        stop = tr.get("stop", "?")
        if stop == "cap":
            gain = tr.get("last_gain")
            stop = (f"**cap, still improving** (+{gain:.1f} at the last validation) {CAP_MARK}"
                    if tr.get("still_improving") else "cap")
        cap = [f"{k} {tr[k]}" for k in ("max_epochs", "max_steps") if tr.get(k) not in (None, -1)]
        acc = tr.get("final_modality_acc")
        cfg_hash = next((r.record.get("config_hash") for r in board.ok[eid][seed].cells.values()
                         if r.record.get("config_hash")), "")
        def num(key: str, fmt: str = "{:,}") -> str:  # a record of an older run may lack a field
            return "-" if tr.get(key) is None else fmt.format(tr[key])

        rows.append([eid, str(seed), num("epochs", "{}") + (f" ({', '.join(cap)})" if cap else ""),
                     num("optimizer_steps"), num("pairs_seen"), num("images_encoded"), num("best_epoch", "{}"), num("best_val_rsum", "{:.1f}"), stop,
                     "-" if acc is None else f"{acc:.1f}%", f"`{cfg_hash[:10]}`" if cfg_hash else "-"])
    return _md_table(header, rows)


def plot_val_curves(board: Board, out_dir: Path) -> Path | None:
    """Validation RSUM against epoch, one line per (entry, seed), the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = training_rows(board)
    if not any(tr.get("val_curve") for _, _, tr in rows):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for eid, seed, tr in rows:
        curve = tr.get("val_curve") or []
        if not curve:
            continue
        xs, ys = [c["epoch"] + 1 for c in curve], [c["rsum"] for c in curve]
        label = eid if len(board.spec.seeds) == 1 else f"{eid} s{seed}"
        (line,) = ax.plot(xs, ys, marker=".", label=label)
        if tr.get("best_epoch") is not None:
            ax.plot([tr["best_epoch"]], [tr["best_val_rsum"]], marker="*", ms=11, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation RSUM")
    ax.set_title("Validation RSUM during training (* = best, the checkpoint evaluated)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "val_rsum_curves.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def _verdict(rs: Resampler, claim: str, a: str, b: str, cells: Sequence[str]) -> str | None:
    d = rs.paired(a, b, cells)
    if d is None:
        return None
    diff, lo, hi = d
    word = "**significant**" if lo > 0 or hi < 0 else "not significant"
    return (f"- {claim}: `{a}` − `{b}` = {diff:+.1f} RSUM, 95% CI [{lo:+.1f}, {hi:+.1f}], {word}"
            f"{' (' + ('higher' if diff > 0 else 'lower') + ')' if lo > 0 or hi < 0 else ''}.")


def _ic(name: str, severity: int) -> str:
    return cell_id("imagenet_c", corruption=name, severity=severity)


def _rc(name: str, rate: float) -> str:
    return cell_id("rcit", corruption=name, rate=rate)


def _tx(perturbation: str, level: int) -> str:
    return cell_id("text", perturbation=perturbation, level=level)


def paired_twins(spec: Spec) -> list[tuple[Entry, Entry]]:
    """(paired-view entry, its twin): each entry of a method that trains on (clean, corrupted) pairs, with every
    'augment' entry of the baseline's method trained on the same corruption mix, the fair comparison of the
    RCIT paper (the same corrupted images seen, without the pairing)."""
    if spec.baseline is None:
        return []
    base_method = spec.entry(spec.baseline).method
    mix = lambda e: sorted(map(str, e.corruption_mix))  # noqa: E731
    return [(r, v) for r in spec.entries if method_class(r.method).needs_paired_views
            for v in spec.entries if v.method == base_method and v.regime == "augment" and mix(v) == mix(r)]


def verdicts(board: Board, rs: Resampler) -> list[str]:
    """One line per claim of the seed papers, from the numbers: the difference, its paired 95% interval, and
    "significant" only when the interval excludes 0."""
    spec = board.spec
    lines: list[str] = []
    rc = spec.evaluation.get("rcit_protocol")
    if rc:
        rate = rc["main_pixel_noise_rate"]
        for r, v in paired_twins(spec):
            cells = [_rc(n, rate) for n in rc["corruptions"]]
            for name, cell in zip(rc["corruptions"], cells):
                line = _verdict(rs, f"{r.id} vs {v.id} (the baseline's method trained on the same corruptions), "
                                    f"RCIT protocol ({name}, rate {rate:g})", r.id, v.id, [cell])
                if line:
                    lines.append(line)
            if len(cells) > 1 and (line := _verdict(rs, f"the same, mean over the RCIT corruptions at rate "
                                                        f"{rate:g}", r.id, v.id, cells)):
                lines.append(line)
    base = spec.baseline
    ic_cells = [_ic(n, s) for n in board.ic_corruptions for s in board.ic_severities]
    if base is not None:
        for e in spec.entries:
            if e.id == base or e.mismatch_rate or e.small_loss:  # judged in the correspondence-noise section
                continue
            if spec.evaluation.get("clean") and (line := _verdict(rs, "clean test set, vs the baseline", e.id, base,
                                                                  ["clean"])):
                lines.append(line)
            if ic_cells and e.evaluates("imagenet_c") and (line := _verdict(rs, "mean corrupted RSUM (ImageNet-C grid), vs the baseline", e.id,
                                              base, ic_cells)):
                lines.append(line)
    return lines


def corruption_source_note(board: Board) -> str | None:
    """Which source the corruptions that can differ between installations used (frost: the ImageNet-C frost
    photographs, or the procedural fallback, which is not comparable with published frost numbers)."""
    used: dict[str, set[str]] = defaultdict(set)
    for r in board.rows:
        if r.corruption and r.record.get("corruption_source"):
            used[r.corruption].add(r.record["corruption_source"])
    if not used:
        return None
    parts = [f"`{name}`: {' and '.join(sorted(srcs))}" for name, srcs in sorted(used.items())]
    note = "Corruption sources: " + "; ".join(parts) + "."
    if any("procedural" in srcs for srcs in used.values()):
        note += (" **procedural** means the ImageNet-C photographs were not installed (`pip install "
                 "rcit-bench[imagenet-c]`) and a procedural stand-in was used: those cells are not comparable with "
                 "published numbers.")
    return note


def image_change_table(board: Board) -> str | None:
    """Mean absolute change of the test images per corruption and level, in 8-bit grey levels (PSNR in dB)."""
    cols: list[tuple[str, list[tuple[str, str]]]] = []
    if board.ic_corruptions:
        cols += [(n, [(f"s{s}", _ic(n, s)) for s in board.ic_severities]) for n in board.ic_corruptions]
    rc = board.spec.evaluation.get("rcit_protocol")
    if rc:
        cols += [(n, [(f"r{r:g}", _rc(n, r)) for r in rc["pixel_noise_rates"]]) for n in rc["corruptions"]]
    rows_by_cell: dict[str, ResultRow] = {}
    for seeds in board.ok.values():
        for es in seeds.values():
            for c, r in es.cells.items():
                if r.record.get("image_change"):
                    rows_by_cell.setdefault(c, r)
    if not rows_by_cell:
        return None
    levels = sorted({lv for _, lvs in cols for lv, _ in lvs}, key=lambda x: (x[0] != "s", float(x[1:])))  # severities, then rates
    table = []
    for name, lvs in cols:
        row = [name]
        by_level = dict(lvs)
        for lv in levels:
            r = rows_by_cell.get(by_level.get(lv, ""))
            if r is None:
                row.append("")
                continue
            ch = r.record["image_change"]
            psnr = "∞" if ch.get("psnr_db") is None else f"{ch['psnr_db']:.0f}"
            txt = f"{255 * ch['mean_abs_diff']:.1f} ({psnr} dB)"
            row.append(f"**{txt}** {UNCHANGED_MARK}" if ch.get("barely_changed") else txt)
        table.append(row)
    return _md_table(["corruption"] + levels, table)


def _wandb_cell(board: Board, entry: str) -> str:
    out = []
    for seed, es in sorted(board.ok.get(entry, {}).items()):
        r = next(iter(es.cells.values()))
        if r.wandb_url:
            out.append(f"[{r.wandb_run_id}]({r.wandb_url})")
        elif r.wandb_run_id:
            out.append(f"`{r.wandb_run_id}`")
    return " ".join(out) or "-"


def main_table(board: Board, rs: Resampler | None = None) -> str:
    """entry, regime, clean recalls, RSUM [95% CI], robustness summaries; mean ± std over seeds; best bold."""
    rs = rs or Resampler(board)
    header = ["entry", "method", "regime", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10",
              "RSUM [95% CI]", "mean corr. RSUM [95% CI]", "rel. robustness", "MMI", "mCE (%)", "seeds", "W&B run"]
    higher: list[bool | None] = [None, None, None] + [True] * 7 + [
        SUMMARY_DIRECTION[k] for k in ("mean_corrupted_rsum", "relative_robustness", "mmi", "mce")] + [None, None]
    text_rows, value_rows = [], []
    zero_shot = dict(pretrained_entries(board))
    for e in board.spec.entries:
        seeds = board.ok.get(e.id, {})
        if not seeds and board.failed.get(e.id):
            reason = board.failed[e.id][0].reason.replace("|", "/").replace("\n", " ")
            text_rows.append([e.id, e.method, e.regime, f"**failed**: {reason}"] + ["-"] * (len(header) - 4))
            value_rows.append([None] * len(header))
            continue
        method = e.method + (f" (`{zero_shot[e.id]}`)" if e.id in zero_shot else "")
        regime = "pretrained (zero-shot)" if e.id in zero_shot else e.regime
        texts = [e.id + (f" {STALE_MARK}" if e.id in board.stale_entries else ""), method, regime]
        vals: list[float | None] = [None, None, None]
        for key in RECALLS:
            v = board.cell_metric(e.id, "clean", key)
            texts.append(_fmt(v))
            vals.append(_mean_std(v)[0] if v else None)
        text, value = _rsum_with_ci(board, rs, e.id, ["clean"])
        texts.append(text)
        vals.append(value)
        summ = {s: board.summaries(e.id, s) for s in seeds}
        ic_cells = [_ic(n, s) for n in board.ic_corruptions for s in board.ic_severities]
        text, value = _rsum_with_ci(board, rs, e.id, ic_cells) if ic_cells else ("-", None)
        texts.append(text)
        vals.append(value)
        for key, digits in (("relative_robustness", 3), ("mmi", 3), ("mce", 1)):
            v = [d[key] for d in summ.values() if key in d]
            texts.append(_fmt(v, digits))
            vals.append(_mean_std(v)[0] if v else None)
        nfail = len({r.seed for r in board.failed.get(e.id, [])})
        texts.append(f"{len(seeds)}" + (f" (+{nfail} failed)" if nfail else ""))
        texts.append(_wandb_cell(board, e.id))
        vals += [None, None]
        text_rows.append(texts)
        value_rows.append(vals)
    _bold_best(text_rows, value_rows, higher)
    return _md_table(header, text_rows)


def _grid_table(board: Board, columns: list[tuple[str, list[str]]], key: str = "rsum",
                higher: bool = True, entries: Iterable[str] | None = None, digits: int = 1) -> str:
    """Rows = entries, columns = (title, cell ids averaged per seed); best per column bold."""
    ids = list(entries) if entries is not None else [e.id for e in board.spec.entries]
    text_rows, value_rows = [], []
    for eid in ids:
        texts, vals = [eid], [None]
        for _, cells in columns:
            def avg(es: EntrySeed, seed: int, cells: list[str] = cells) -> float | None:
                got = [es.cells[c].metrics[key] for c in cells if c in es.cells and key in es.cells[c].metrics]
                return sum(got) / len(got) if len(got) == len(cells) else None

            v = board.per_seed(eid, avg)
            texts.append(_fmt(v, digits) + (_cell_marks(board, eid, cells) if v else ""))
            vals.append(_mean_std(v)[0] if v else None)
        text_rows.append(texts)
        value_rows.append(vals)
    _bold_best(text_rows, value_rows, [None] + [higher] * len(columns))
    return _md_table(["entry"] + [t for t, _ in columns], text_rows)


def rcit_table(board: Board, rs: Resampler | None = None) -> str:
    """The RCIT paper's layout: per entry and corrupted test set at the main rate, R@1/5/10 both ways,
    RSUM [95% CI]."""
    rs = rs or Resampler(board)
    rc = board.spec.evaluation["rcit_protocol"]
    rate = rc["main_pixel_noise_rate"]
    header = ["entry", "regime", "test corruption", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5",
              "t2i R@10", "RSUM [95% CI]"]
    text_rows, value_rows = [], []
    for e in [x for x in board.spec.entries if x.evaluates("rcit")]:
        for name in ["clean"] + list(rc["corruptions"]):
            cell = "clean" if name == "clean" else _rc(name, rate)
            label = "clean" if name == "clean" else f"{name} (rate {rate:g})"
            texts, vals = [e.id, e.regime, label], [None, None, None]
            for key in RECALLS:
                v = board.cell_metric(e.id, cell, key)
                texts.append(_fmt(v))
                vals.append(_mean_std(v)[0] if v else None)
            text, value = _rsum_with_ci(board, rs, e.id, [cell])
            texts.append(text)
            vals.append(value)
            text_rows.append(texts)
            value_rows.append(vals)
    return _md_table(header, text_rows)


def _evaluating(spec: Spec, kind: str) -> list[str]:
    """The ids of the entries evaluated on cells of `kind`."""
    return [e.id for e in spec.entries if e.evaluates(kind)]


def noise_rows(spec: Spec) -> list[tuple[str, dict[float, str], str | None]]:
    """The rows of the correspondence-noise table: (label, mismatch rate -> entry id, the entry that is this row's
    rate-0 reference). A row is a family of entries that differ only in their mismatch rate; a small-loss row
    without its own rate-0 entry is referred to its plain method's rate 0. Only families with a rate above 0."""
    fams: dict[str, dict[float, str]] = defaultdict(dict)
    for e in spec.entries:
        fams[entry_family(spec, e.id)].setdefault(e.mismatch_rate, e.id)
    plain_zero = {entry_family(spec, e.id, small_loss=False): e.id for e in spec.entries
                  if not e.mismatch_rate and not e.small_loss}
    rows = []
    for fam, members in fams.items():
        if not any(members):
            continue
        first = spec.entry(next(iter(members.values())))
        stem = first.id.split("-mis")[0]  # a sweep's own id, without the member's rate
        label = f"`{stem}` ({first.method}, {first.regime}{', small-loss' if first.small_loss else ''})"
        ref = members.get(0.0) or plain_zero.get(entry_family(spec, first.id, small_loss=False))
        rows.append((label, dict(sorted(members.items())), ref))
    return rows


def noise_section(board: Board, rs: Resampler, out: Path) -> list[str]:
    """Correspondence noise: clean-test RSUM against the mismatch rate of the training pairs, the relative drop from
    rate 0, how well the small-loss selection flagged the mismatched pairs, paired verdicts, a plot and the
    figures papers report."""
    spec = board.spec
    rows = noise_rows(spec)
    if not rows or not spec.evaluation.get("clean"):
        return []
    md = ["## Correspondence noise (mismatched training pairs)\n",
          "Mismatch rate = the fraction of *training* captions paired with another image than their own (exactly "
          "round(rate x captions) of them, none landing back on its own image, chosen from the entry's mismatch "
          "seed), the noise rate of NCR and its successors; not the pixel noise rate of the RCIT cells. **Only the "
          "training split is mismatched: checkpoints are selected on the clean validation split and every number "
          "here is on the clean test split**, as in NCR. *drop* = 1 - RSUM(rate) / RSUM(0) of the row (†: of the "
          "plain method's rate-0 entry, for a defence trained only under noise).\n"]
    rates = sorted({r for _, members, _ in rows for r in members} | {0.0})
    header = ["training (method, regime)"] + [f"mismatch {r:g}" for r in rates] +         [f"drop at {r:g}" for r in rates if r]
    table = []
    for label, members, ref in rows:
        cells = []
        for r in rates:
            eid = members.get(r, ref if r == 0 else None)
            text = _rsum_with_ci(board, rs, eid, ["clean"])[0] if eid else "-"
            cells.append(f"{text} (`{eid}`)" if eid and text != "-" else text)
        base = board.cell_metric(ref, "clean") if ref else []
        drops = []
        for r in rates[1:]:
            v = board.cell_metric(members[r], "clean") if r in members else []
            if v and base and _mean_std(base)[0] > 0:
                drop = 1.0 - _mean_std(v)[0] / _mean_std(base)[0]
                drops.append(f"{100 * drop:.1f}%" + ("" if 0.0 in members else " †"))
            else:
                drops.append("-")
        table.append([label] + cells + drops)
    md.append(_md_table(header, table) + "\n")
    detail = []
    for e in spec.entries:
        if not e.mismatch_rate and not e.small_loss:
            continue
        rec = next((r.record for es in board.ok.get(e.id, {}).values() for r in es.cells.values()), None)
        noise = (rec or {}).get("correspondence_noise") or {}
        sel = ((rec or {}).get("training") or {}).get("small_loss_selection") or {}
        last = sel[max(sel, key=int)] if sel else None
        actual = noise.get("mismatch_actual")
        detail.append([f"`{e.id}`", f"{e.mismatch_rate:g}", "-" if actual is None else f"{actual:.4f}",
                       str(e.mismatch_seed) if e.mismatch_rate else "-", "yes" if e.small_loss else "no",
                       "-" if last is None else f"{100 * last['precision']:.1f}%",
                       "-" if last is None else f"{100 * last['recall']:.1f}%"])
    md.append("Per entry: the nominal and the actual mismatch fraction of its training split (from its result "
              "files), and for the small-loss selection (per-pair triplet losses, a two-component Gaussian mixture "
              "fitted on them after every epoch, pairs weighted by their posterior of the low-loss component) the "
              "precision and recall of the pairs it flags as mismatched (posterior below 0.5) after the last epoch, "
              "measured against the known mismatch.\n")
    md.append(_md_table(["entry", "mismatch rate", "actual", "mismatch seed", "small-loss", "flagged: precision",
                         "flagged: recall"], detail) + "\n")
    lines = []
    for label, members, ref in rows:
        for r, eid in members.items():
            if r and ref and (line := _verdict(rs, f"clean test, {label} at mismatch rate {r:g} vs rate 0", eid, ref,
                                               ["clean"])):
                lines.append(line)
    for e in spec.entries:  # a defence against its plain method at the same rate
        if not e.small_loss:
            continue
        fam = entry_family(spec, e.id, small_loss=False)
        for p in spec.entries:
            if (not p.small_loss and p.mismatch_rate == e.mismatch_rate
                    and entry_family(spec, p.id, small_loss=False) == fam):
                line = _verdict(rs, f"clean test, small-loss selection vs plain training at mismatch rate "
                                    f"{e.mismatch_rate:g}", e.id, p.id, ["clean"])
                if line:
                    lines.append(line)
    if lines:
        md.append("Paired verdicts (both entries scored on the same resampled test images):\n\n" + "\n".join(lines)
                  + "\n")
    plot = plot_mismatch(board, rs, rows, rates, out)
    if plot is not None:
        md.append(f"![RSUM vs mismatch rate]({plot.name})\n")
    md.append("Reported by the papers (not measured by this suite; clean-test RSUM after training under the stated "
              "mismatch rate):\n")
    md.append(_md_table(["method (as reported)", "dataset", "mismatch rate", "RSUM", "source", "note"],
                        [[r.method, r.dataset, f"{r.mismatch_rate:g}", f"{r.rsum:.1f}", r.citation, r.note]
                         for r in REPORTED_NOISE]) + "\n")
    return md


def plot_mismatch(board: Board, rs: Resampler, rows: list[tuple[str, dict[float, str], str | None]],
                  rates: list[float], out_dir: Path) -> Path | None:
    """Clean-test RSUM vs the mismatch rate of the training pairs, a line per row with 95% bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    drawn = False
    for label, members, ref in rows:
        xs, ys, lo, hi = [], [], [], []
        for r in rates:
            eid = members.get(r, ref if r == 0 else None)
            ci = rs.interval(eid, ["clean"]) if eid else None
            if ci is None:
                continue
            xs.append(r)
            ys.append(ci[0])
            lo.append(ci[0] - ci[1])
            hi.append(ci[2] - ci[0])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label.replace("`", ""))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("mismatch rate of the training pairs")
    ax.set_ylabel("clean-test RSUM")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "rsum_vs_mismatch_rate.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def reported_table() -> str:
    rows = [[r.method, " / ".join(f"{x:.1f}" for x in r.i2t), " / ".join(f"{x:.1f}" for x in r.t2i),
             f"{r.rsum:.1f}", r.note] for r in REPORTED]
    return _md_table(["method (as reported)", "i2t R@1/5/10", "t2i R@1/5/10", "RSUM", "note"], rows)


def write_csv(board: Board, path: Path) -> None:
    """Every result cell of the spec (ok and failed), one row each."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    mismatch = {e.id: e.mismatch_rate for e in board.spec.entries}
    w.writerow(["entry", "method", "regime", "mismatch_rate", "seed", "cell", "kind", "corruption", "severity",
                "pixel_noise_rate", "perturbation",
                "level", "status", "reason", *CSV_METRICS, "rsum_ci_lo", "rsum_ci_hi", "i2t_ties", "t2i_ties",
                "image_mean_abs_diff", "image_psnr_db", "wandb_run_id"])
    for r in sorted(board.rows, key=lambda r: (r.entry, r.seed, r.cell)):
        ci = (r.record.get("intervals") or {}).get("rsum") or ["", ""]
        ties = r.record.get("ties") or {}
        ch = r.record.get("image_change") or {}
        w.writerow([r.entry, r.method, r.regime, repr(mismatch.get(r.entry, 0.0)), r.seed, r.cell, r.kind, r.corruption or "", r.severity or "",
                    "" if r.rate is None else r.rate, r.perturbation or "", r.level or "", r.status, r.reason,
                    *["" if k not in r.metrics else repr(r.metrics[k]) for k in CSV_METRICS], *ci,
                    ties.get("i2t", ""), ties.get("t2i", ""), "" if "mean_abs_diff" not in ch else repr(ch["mean_abs_diff"]),
                    "" if ch.get("psnr_db") is None else repr(ch["psnr_db"]), r.wandb_run_id or ""])
    atomic_write_text(path, buf.getvalue())


def _savefig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_severity(board: Board, out_dir: Path) -> list[Path]:
    """One PNG per corruption family: a panel per corruption, RSUM vs severity (0 = clean), a line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rcit_bench.data.corruptions import corruption_info

    families: dict[str, list[str]] = defaultdict(list)
    for name in board.ic_corruptions:  # the spec was validated: every name is registered
        families[corruption_info(name).family].append(name)
    paths = []
    for fam, names in sorted(families.items()):
        ncol = min(len(names), 4)
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for e in board.spec.entries:
                xs, ys = [], []
                for s in [0] + board.ic_severities:
                    v = board.cell_metric(e.id, "clean" if s == 0 else _ic(name, s))
                    if v:
                        xs.append(s)
                        ys.append(_mean_std(v)[0])
                if xs:
                    ax.plot(xs, ys, marker="o", label=e.id)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel("RSUM")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=8,
                       bbox_to_anchor=(0.5, 1.0 + 0.06 / nrow))
        fig.suptitle(f"RSUM vs severity: {fam}", y=1.0 + 0.12 / nrow)
        fig.tight_layout()
        path = out_dir / f"rsum_vs_severity_{fam}.png"
        _savefig(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_rate(board: Board, out_dir: Path) -> Path:
    """RSUM vs noise rate for the RCIT corruptions (0 = clean), a panel per corruption, a line per entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc = board.spec.evaluation["rcit_protocol"]
    names = rc["corruptions"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for e in [x for x in board.spec.entries if x.evaluates("rcit")]:
            xs, ys = [], []
            for r in [0.0] + list(rc["pixel_noise_rates"]):
                v = board.cell_metric(e.id, "clean" if r == 0 else _rc(name, r))
                if v:
                    xs.append(r)
                    ys.append(_mean_std(v)[0])
            if xs:
                ax.plot(xs, ys, marker="o", label=e.id)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("pixel noise rate (0 = clean)")
        ax.set_ylabel("RSUM")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "rsum_vs_rate.png"
    _savefig(fig, path)
    plt.close(fig)
    return path


def _rel(target: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()
    except ValueError:  # different drives on Windows
        return target.name


STALE_MARK = "§"


def stale_summary(spec: Spec, stale: list[ResultRow]) -> list[str]:
    """One line per entry with stale results: how many, and what differs from the current configuration."""
    from rcit_bench.bench.runner import composed_config, method_config

    lines = []
    by_entry: dict[str, list[ResultRow]] = defaultdict(list)
    for r in stale:
        by_entry[r.entry].append(r)
    for eid, rows in by_entry.items():
        entry = spec.entry(eid)
        old = rows[0].record.get("config")
        diffs: list[str] = []
        if isinstance(old, dict):
            diffs = config_diff(old, composed_config(spec, entry, rows[0].seed, method_config(spec, entry)))
        what = ", ".join(diffs[:4]) + (f", ... ({len(diffs)} differences)" if len(diffs) > 4 else "") if diffs else \
            "the entry hash differs (its method config file or the spec's dataset or trainer changed)"
        lines.append(f"`{eid}`: {len(rows)} result file(s) of another configuration ({what})")
    return lines


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key.path: old -> new`` for every leaf that differs between two nested configs (``(unset)`` for a key
    only one side has)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) & set(new), key=str):
            out += config_diff(old[k], new[k], f"{prefix}{k}.")
        return out + [f"{prefix}{k}: {'(unset)' if k not in old else repr(old[k])} -> "
                      f"{'(unset)' if k not in new else repr(new[k])}"
                      for k in sorted(set(old) ^ set(new), key=str) if isinstance(old.get(k, new.get(k)), (str, int, float, bool))]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def build_leaderboard(spec_path: str | Path | Spec, results_dir: str | Path = "runs",
                      out_dir: str | Path | None = None, include_stale: bool = False) -> Path:
    """Write ``README.md``, ``results.csv`` and PNG plots for a spec into ``out_dir``
    (default ``leaderboards/<spec name>``) from the result files under ``results_dir``. Returns the README path.

    Only results of the spec's current configuration are shown: results of another entry hash are left out
    and counted in a warning saying what differs (``include_stale=True`` shows them, marked). With no result
    to show, nothing is written (UserError). The board is built in a folder beside ``out_dir`` and swapped in
    whole, so a failure midway leaves the previous board as it was."""
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path, check_devices=False)
    out = Path(out_dir) if out_dir is not None else Path("leaderboards") / spec.name
    board = Board(spec, list(iter_results(results_dir, spec.name)), include_stale=include_stale)
    searched = Path(results_dir) / spec.name
    if board.stale and not include_stale:
        log.warning("left out %d stale result file(s) of spec %r (another configuration than the spec's; rerun "
                    "`rcit-bench bench` to update them, or pass --include-stale to show them marked):\n  %s",
                    len(board.stale), spec.name, "\n  ".join(stale_summary(spec, board.stale)))
    if not board.rows:
        stale = f" ({len(board.stale)} stale result file(s) left out, see the warning)" if board.stale else ""
        raise UserError(f"No result files of spec {spec.name!r} under {searched}{stale}: nothing to publish, and "
                        f"{out} was left as it is. Check --results-dir, or run `rcit-bench bench {spec.name}` first.")
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        _write_board(spec, board, building)
        _swap_in(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log.debug("leaderboard for %s: %s", spec.name, out / "README.md")
    return out / "README.md"


def _swap_in(new: Path, out: Path) -> None:
    """Replace the folder `out` by `new` (two renames on one filesystem; the old board is removed last)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_board(spec: Spec, board: Board, out: Path) -> None:
    ev = spec.evaluation
    md: list[str] = []
    md.append(f"<!-- generated by rcit-bench from {len(board.rows)} result files; do not edit: "
              f"rebuild with `rcit-bench leaderboard {spec.name}` -->")
    md.append(f"# rcit-bench leaderboard: {spec.name}\n")
    if spec.description:
        md.append(spec.description.strip() + "\n")
    rs = Resampler(board)
    md.append(f"Generated by rcit-bench (do not edit). Spec hash `{spec.hash[:12]}`, dataset `{spec.dataset_kind}`, "
              f"seeds {spec.seeds}. Values are mean ± sample std (ddof 1) over seeds when there is more than one; "
              "the best value of each column is bold. Recalls are R@K hit rates in percent; RSUM is their sum "
              "(max 600).\n")
    md.append("**Ranks count ties against the model**: an item that scores at least as high as the match ranks above "
              "it, so a constant or collapsed scorer ranks last, never first. Mean ranks are unrounded, median ranks "
              "floored.\n")
    md.append(f"**Intervals** `[lo, hi]` are 95% percentile intervals of an image-level cluster bootstrap "
              f"({rs.n} resamples of the test images with replacement, each bringing its captions; the gallery stays "
              "the whole split), from the per-query ranks stored beside every result. They cover the sampling of the "
              "test images only"
              + (", for the mean over seeds; the ± std covers the training seeds" if len(spec.seeds) > 1 else
                 "; with one seed, variation between training runs is not covered")
              + f". {TIE_MARK}: more than {TIE_FLAG_FRACTION:.0%} of the queries of a cell had a non-matching item "
              f"tied with their positive. {UNCHANGED_MARK}: the cell's test images barely changed (mean absolute "
              "change below one 8-bit grey level, see *Image change per cell*).\n")
    md.append("Images are corrupted after decoding, at the dataset's resolution, **before** the model's own "
              "resize and normalisation; each image's corruption is seeded by (seed, corruption, level, image id), "
              "so every model sees the same corrupted pixels.\n")
    scaling = spec.dataset_options.get("corruption_scaling", "image")
    md.append("Corruption constants: " + (
        "the 224 px ImageNet-C constants are applied **as published** at the dataset's resolution (as the "
        "`imagecorruptions` package does on any size)." if scaling == "published" else
        "spatial constants are **scaled to the image size** (min(H, W) / 224 of the published 224 px values; random "
        "layers built on the 224 px grid and resized), so a small image looks as if it were corrupted at 224 px. "
        "Some corruptions then barely change small images (marked " + UNCHANGED_MARK + "); "
        "`dataset.options.corruption_scaling: published` applies the published constants instead.") + "\n")
    if note := corruption_source_note(board):
        md.append(note + "\n")
    if board.stale_entries:
        md.append(f"{STALE_MARK} **Includes {len(board.stale)} stale result file(s)** (built with "
                  "`--include-stale`): they come from another configuration than this spec's, so they are not "
                  "its results:\n\n" + "\n".join(f"- {line}" for line in stale_summary(spec, board.stale)) + "\n")
    md.append("## Main table\n")
    md.append(main_table(board, rs) + "\n")
    base = spec.baseline or "(none)"
    md.append(f"Summaries over the ImageNet-C grid ({len(board.ic_corruptions)} corruptions x severities "
              f"{board.ic_severities}): mean corrupted RSUM; relative robustness = mean corrupted / clean RSUM; "
              f"MMI = 1 - relative robustness (lower is better); mCE = per corruption sum over severities of "
              f"(600 - RSUM) divided by the baseline's (`{base}`), averaged over corruptions, in percent "
              "(lower is better; the baseline scores 100).\n")
    lines = verdicts(board, rs)
    if lines:
        md.append("## Verdicts\n")
        md.append("Generated from the numbers: each claim of the seed papers as a difference of RSUM with its paired "
                  "95% bootstrap interval (both entries scored on the same resampled test images"
                  + ("; values are means over the seeds both entries have" if len(spec.seeds) > 1 else "")
                  + "); \"significant\" only when the interval excludes 0.\n")
        md.append("\n".join(lines) + "\n")
    capped = capped_while_improving(board)
    rows_tr = training_rows(board)
    if rows_tr:
        md.append("## Training budget\n")
        es = spec.early_stopping
        rule = (f"training stops when validation RSUM has not improved for {es['patience']} validation(s) "
                f"(min delta {es['min_delta']:g}), within the maximum budget of the spec"
                if es else "early stopping is off: every entry trains to its maximum budget")
        md.append(f"The same rule for every entry: {rule}; the checkpoint with the best validation RSUM (the clean "
                  "validation split) is evaluated. *pairs seen* counts image-caption pairs, *images encoded* the "
                  "images through the image encoder (RCIT encodes a clean and a corrupted copy). Training wall time is "
                  "in every result file (`training.train_wall_time_s`), not here: this page holds only what a rerun of "
                  "the same code reproduces byte for byte.\n")
        md.append(budget_table(board) + "\n")
        if capped:
            md.append(f"{CAP_MARK} **Hit the budget cap while still improving** (the last validation beat every "
                      f"earlier one by more than the min delta): {', '.join(capped)}. Their numbers may understate "
                      "what the method reaches with a larger budget.\n")
        else:
            md.append("Every entry plateaued or hit the cap after its best validation.\n")
        curves = plot_val_curves(board, out)
        if curves is not None:
            md.append(f"![validation RSUM curves]({curves.name})\n")
    loaded = pretrained_entries(board)
    if loaded:
        md.append(("" if rows_tr else "## Training budget\n\n") + "Pretrained (not trained), evaluated zero-shot as "
                  "published: " + ", ".join(f"`{e}` (`{m}`)" for e, m in loaded) + ".\n")
    failed: dict[tuple[str, int, str], list[str]] = defaultdict(list)
    for eid, failed_rows in board.failed.items():
        for r in failed_rows:
            failed[(eid, r.seed, r.reason)].append(r.cell)
    if failed:
        md.append("Failed cells:\n\n" + "\n".join(
            f"- `{eid}` seed {seed}, {len(cells)} cell(s) ({', '.join(cells[:3])}{', ...' if len(cells) > 3 else ''}):"
            f" {reason}" for (eid, seed, reason), cells in failed.items()) + "\n")
    if ev.get("rcit_protocol"):
        rc = ev["rcit_protocol"]
        md.append(f"## RCIT protocol (pixel noise rate {rc['main_pixel_noise_rate']:g}, the RCIT paper's layout)\n")
        md.append("Pixel noise rate = fraction of a test image's pixels corrupted (salt-and-pepper: set to black or "
                  "white; speckle: x + x N(0, s) on the chosen pixels); not the mismatch rate of the training pairs.\n")
        md.append(rcit_table(board, rs) + "\n")
        cols = [(f"{n} r={r:g}", [_rc(n, r)]) for n in rc["corruptions"] for r in rc["pixel_noise_rates"]]
        md.append(_grid_table(board, [("clean", ["clean"])] + cols, entries=_evaluating(spec, "rcit")) + "\n")
        md.append(f"![RSUM vs pixel noise rate]({plot_rate(board, out).name})\n")
    md += noise_section(board, rs, out)
    if board.ic_corruptions:
        md.append("## Per corruption (RSUM averaged over severities "
                  f"{board.ic_severities})\n")
        cols = [(n, [_ic(n, s) for s in board.ic_severities]) for n in board.ic_corruptions]
        md.append(_grid_table(board, cols, entries=_evaluating(spec, "imagenet_c")) + "\n")
        for p in plot_severity(board, out):
            md.append(f"![{p.stem}]({p.name})\n")
    if ev.get("text"):
        tx = ev["text"]
        md.append("## Text perturbations (RSUM; clean images, perturbed captions, rate = 0.05 x level)\n")
        cols = [("clean", ["clean"])] + [(f"{p} L{lv}", [_tx(p, lv)]) for p in tx["perturbations"]
                                         for lv in tx["levels"]]
        md.append(_grid_table(board, cols, entries=_evaluating(spec, "text")) + "\n")
    pg_entries = [e.id for e in spec.entries if any(c.kind == "pointing_game" for c in spec.cells(e))]
    if pg_entries:
        md.append("## Matchmap pointing game (accuracy in percent: word heatmap peak inside the named object's box)\n")
        pg_cells = [c for c in spec.cells(pg_entries[0]) if c.kind == "pointing_game"]
        cols = [("clean" if c.corruption is None else f"{c.corruption} r={c.rate:g}", [c.id]) for c in pg_cells]
        md.append(_grid_table(board, cols, key="accuracy", entries=pg_entries) + "\n")
        md.append("Chance baselines on the same queries: always pointing at the image centre, and the expected hit "
                  "rate of a uniformly random point (the box area over the image area).\n")
        base_rows = [[c_title] + [_fmt(board.cell_metric(eid, cells[0], k)) for k in
                                  ("accuracy", "centre_accuracy", "random_accuracy")]
                     for eid in pg_entries for c_title, cells in cols]
        md.append(_md_table(["cell", "model", "centre", "uniform random"], base_rows) + "\n")
    change = image_change_table(board)
    if change:
        md.append("## Image change per cell\n")
        md.append("How far each cell's test images moved from the clean ones: mean absolute difference in 8-bit grey "
                  "levels (PSNR in dB). Bold and " + UNCHANGED_MARK + ": below 1 grey level on average, i.e. less than "
                  "the rounding of the 8-bit images themselves; such a cell measures (almost) the clean test set.\n")
        md.append(change + "\n")
    md.append("## Reported by the papers (not measured by this suite)\n")
    md.append("Flickr30k 1K test, as printed in the papers; for orientation only, never mixed with the rows above.\n")
    md.append(reported_table() + "\n")
    write_csv(board, out / "results.csv")
    md.append("## Files\n")
    links = ["- every cell: [results.csv](results.csv)"]
    if spec.path is not None:
        links.append(f"- spec: [{spec.path.name}]({_rel(spec.path, out)})")
    for e in spec.entries:
        links.append(f"- `{e.id}` config: [{e.config}]({_rel(config_path(spec, e), out)})"
                     + (f", overrides `{e.overrides}`" if e.overrides else ""))
    md.append("\n".join(links) + "\n")
    atomic_write_text(out / "README.md", "\n".join(md))
