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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rcit_bench.bench.reference import REPORTED
from rcit_bench.bench.results import ResultRow, iter_results
from rcit_bench.bench.spec import Spec, config_path, load_spec
from rcit_bench.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
CSV_METRICS = RECALLS + ("rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "accuracy")
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

    def __init__(self, spec: Spec, rows: list[ResultRow]):
        self.spec = spec
        valid_cells = {e.id: {c.id for c in spec.cells(e)} for e in spec.entries}
        self.rows = [r for r in rows if r.entry in valid_cells and r.cell in valid_cells[r.entry]]
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
                r = es.cells.get(f"ic-{name}-s{s}")
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


def _wandb_cell(board: Board, entry: str) -> str:
    out = []
    for seed, es in sorted(board.ok.get(entry, {}).items()):
        r = next(iter(es.cells.values()))
        if r.wandb_url:
            out.append(f"[{r.wandb_run_id}]({r.wandb_url})")
        elif r.wandb_run_id:
            out.append(f"`{r.wandb_run_id}`")
    return " ".join(out) or "-"


def main_table(board: Board) -> str:
    """entry, regime, clean recalls, RSUM, robustness summaries; mean ± std over seeds; best bold."""
    header = ["entry", "method", "regime", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10",
              "RSUM", "mean corr. RSUM", "rel. robustness", "MMI", "mCE (%)", "seeds", "W&B run"]
    higher: list[bool | None] = [None, None, None] + [True] * 7 + [
        SUMMARY_DIRECTION[k] for k in ("mean_corrupted_rsum", "relative_robustness", "mmi", "mce")] + [None, None]
    text_rows, value_rows = [], []
    for e in board.spec.entries:
        seeds = board.ok.get(e.id, {})
        if not seeds and board.failed.get(e.id):
            reason = board.failed[e.id][0].reason.replace("|", "/").replace("\n", " ")
            text_rows.append([e.id, e.method, e.regime, f"**failed**: {reason}"] + ["-"] * (len(header) - 4))
            value_rows.append([None] * len(header))
            continue
        texts = [e.id, e.method, e.regime]
        vals: list[float | None] = [None, None, None]
        for key in RECALLS + ("rsum",):
            v = board.cell_metric(e.id, "clean", key)
            texts.append(_fmt(v))
            vals.append(_mean_std(v)[0] if v else None)
        summ = {s: board.summaries(e.id, s) for s in seeds}
        for key, digits in (("mean_corrupted_rsum", 1), ("relative_robustness", 3), ("mmi", 3), ("mce", 1)):
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
            texts.append(_fmt(v, digits))
            vals.append(_mean_std(v)[0] if v else None)
        text_rows.append(texts)
        value_rows.append(vals)
    _bold_best(text_rows, value_rows, [None] + [higher] * len(columns))
    return _md_table(["entry"] + [t for t, _ in columns], text_rows)


def rcit_table(board: Board) -> str:
    """The RCIT paper's layout: per entry and corrupted test set at the main rate, R@1/5/10 both ways, RSUM."""
    rc = board.spec.evaluation["rcit_protocol"]
    rate = rc["main_rate"]
    header = ["entry", "regime", "test corruption", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5",
              "t2i R@10", "RSUM"]
    text_rows, value_rows = [], []
    for e in board.spec.entries:
        for name in ["clean"] + list(rc["corruptions"]):
            cell = "clean" if name == "clean" else f"rcit-{name}-r{rate:g}"
            label = "clean" if name == "clean" else f"{name} (rate {rate:g})"
            texts, vals = [e.id, e.regime, label], [None, None, None]
            for key in RECALLS + ("rsum",):
                v = board.cell_metric(e.id, cell, key)
                texts.append(_fmt(v))
                vals.append(_mean_std(v)[0] if v else None)
            text_rows.append(texts)
            value_rows.append(vals)
    return _md_table(header, text_rows)


def reported_table() -> str:
    rows = [[r.method, " / ".join(f"{x:.1f}" for x in r.i2t), " / ".join(f"{x:.1f}" for x in r.t2i),
             f"{r.rsum:.1f}", r.note] for r in REPORTED]
    return _md_table(["method (as reported)", "i2t R@1/5/10", "t2i R@1/5/10", "RSUM", "note"], rows)


def write_csv(board: Board, path: Path) -> None:
    """Every result cell of the spec (ok and failed), one row each."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["entry", "method", "regime", "seed", "cell", "kind", "corruption", "severity", "rate", "perturbation",
                "level", "status", "reason", *CSV_METRICS, "wandb_run_id"])
    for r in sorted(board.rows, key=lambda r: (r.entry, r.seed, r.cell)):
        w.writerow([r.entry, r.method, r.regime, r.seed, r.cell, r.kind, r.corruption or "", r.severity or "",
                    "" if r.rate is None else r.rate, r.perturbation or "", r.level or "", r.status, r.reason,
                    *["" if k not in r.metrics else repr(r.metrics[k]) for k in CSV_METRICS], r.wandb_run_id or ""])
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

    try:
        from rcit_bench.data.corruptions import CORRUPTION_FAMILIES
    except ImportError:
        CORRUPTION_FAMILIES = {}
    families: dict[str, list[str]] = defaultdict(list)
    for name in board.ic_corruptions:
        families[CORRUPTION_FAMILIES.get(name, "other")].append(name)
    paths = []
    for fam, names in sorted(families.items()):
        ncol = min(len(names), 4)
        nrow = math.ceil(len(names) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.8 * nrow), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for e in board.spec.entries:
                xs, ys = [], []
                for s in [0] + board.ic_severities:
                    v = board.cell_metric(e.id, "clean" if s == 0 else f"ic-{name}-s{s}")
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
        for e in board.spec.entries:
            xs, ys = [], []
            for r in [0.0] + list(rc["rates"]):
                v = board.cell_metric(e.id, "clean" if r == 0 else f"rcit-{name}-r{r:g}")
                if v:
                    xs.append(r)
                    ys.append(_mean_std(v)[0])
            if xs:
                ax.plot(xs, ys, marker="o", label=e.id)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("noise rate (0 = clean)")
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


def build_leaderboard(spec_path: str | Path | Spec, results_dir: str | Path = "runs",
                      out_dir: str | Path | None = None) -> Path:
    """Write ``README.md``, ``results.csv`` and PNG plots for a spec into ``out_dir``
    (default ``leaderboards/<spec name>``) from the result files under ``results_dir``. Returns the README path."""
    spec = spec_path if isinstance(spec_path, Spec) else load_spec(spec_path)
    out = Path(out_dir) if out_dir is not None else Path("leaderboards") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    rows = list(iter_results(results_dir, spec.name))
    board = Board(spec, rows)
    if not board.rows:
        log.warning("no result files for spec %r under %s: the leaderboard will be empty", spec.name, results_dir)
    ev = spec.evaluation
    md: list[str] = []
    md.append(f"<!-- generated by rcit-bench from {len(board.rows)} result files; do not edit: "
              f"rebuild with `rcit-bench leaderboard {spec.name}` -->")
    md.append(f"# rcit-bench leaderboard: {spec.name}\n")
    if spec.description:
        md.append(spec.description.strip() + "\n")
    md.append(f"Generated by rcit-bench (do not edit). Spec hash `{spec.hash[:12]}`, dataset `{spec.dataset_kind}`, "
              f"seeds {spec.seeds}. Values are mean ± sample std (ddof 1) over seeds when there is more than one; "
              "the best value of each column is bold. Recalls are R@K hit rates in percent; RSUM is their sum "
              "(max 600).\n")
    md.append("Images are corrupted after decoding, at the dataset's resolution, **before** the model's own "
              "resize and normalisation; each image's corruption is seeded by (seed, corruption, level, image id), "
              "so every model sees the same corrupted pixels.\n")
    md.append("## Main table\n")
    md.append(main_table(board) + "\n")
    base = spec.baseline or "(none)"
    md.append(f"Summaries over the ImageNet-C grid ({len(board.ic_corruptions)} corruptions x severities "
              f"{board.ic_severities}): mean corrupted RSUM; relative robustness = mean corrupted / clean RSUM; "
              f"MMI = 1 - relative robustness (lower is better); mCE = per corruption sum over severities of "
              f"(600 - RSUM) divided by the baseline's (`{base}`), averaged over corruptions, in percent "
              "(lower is better; the baseline scores 100).\n")
    failed: dict[tuple[str, int, str], list[str]] = defaultdict(list)
    for eid, rs in board.failed.items():
        for r in rs:
            failed[(eid, r.seed, r.reason)].append(r.cell)
    if failed:
        md.append("Failed cells:\n\n" + "\n".join(
            f"- `{eid}` seed {seed}, {len(cells)} cell(s) ({', '.join(cells[:3])}{', ...' if len(cells) > 3 else ''}):"
            f" {reason}" for (eid, seed, reason), cells in failed.items()) + "\n")
    if ev.get("rcit_protocol"):
        rc = ev["rcit_protocol"]
        md.append(f"## RCIT protocol (noise rate {rc['main_rate']:g}, the RCIT paper's layout)\n")
        md.append("Noise rate = fraction of pixels corrupted (salt-and-pepper: set to black or white; speckle: "
                  "x + x N(0, s) on the chosen pixels).\n")
        md.append(rcit_table(board) + "\n")
        cols = [(f"{n} r={r:g}", [f"rcit-{n}-r{r:g}"]) for n in rc["corruptions"] for r in rc["rates"]]
        md.append(_grid_table(board, [("clean", ["clean"])] + cols) + "\n")
        md.append(f"![RSUM vs noise rate]({plot_rate(board, out).name})\n")
    if board.ic_corruptions:
        md.append("## Per corruption (RSUM averaged over severities "
                  f"{board.ic_severities})\n")
        cols = [(n, [f"ic-{n}-s{s}" for s in board.ic_severities]) for n in board.ic_corruptions]
        md.append(_grid_table(board, cols) + "\n")
        for p in plot_severity(board, out):
            md.append(f"![{p.stem}]({p.name})\n")
    if ev.get("text"):
        tx = ev["text"]
        md.append("## Text perturbations (RSUM; clean images, perturbed captions, rate = 0.05 x level)\n")
        cols = [("clean", ["clean"])] + [(f"{p} L{lv}", [f"text-{p}-l{lv}"]) for p in tx["perturbations"]
                                         for lv in tx["levels"]]
        md.append(_grid_table(board, cols) + "\n")
    pg_entries = [e.id for e in spec.entries if any(c.kind == "pointing_game" for c in spec.cells(e))]
    if pg_entries:
        md.append("## Matchmap pointing game (accuracy in percent: word heatmap peak inside the named object's box)\n")
        pg_cells = [c for c in spec.cells(pg_entries[0]) if c.kind == "pointing_game"]
        cols = [("clean" if c.corruption is None else f"{c.corruption} r={c.rate:g}", [c.id]) for c in pg_cells]
        md.append(_grid_table(board, cols, key="accuracy", entries=pg_entries) + "\n")
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
    readme = out / "README.md"
    atomic_write_text(readme, "\n".join(md))
    log.info("leaderboard for %s: %s", spec.name, readme)
    return readme
