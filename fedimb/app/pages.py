"""The results pages under docs/results/: where a page keeps its sources, and the pieces every page is made of.

A page ``docs/results/NAME.md`` keeps what it is built from in ``docs/results/NAME/``:

    records.jsonl.gz   the runs it shows (config, rounds and summary of each; see fedimb.report)
                       after a header line with the command that made the page and when
    notes.md           the hand-written reading, inserted where the page puts it (optional)
    *.png              plots and sample grids

A benchmark (``fedimb bench NAME``) runs its cells through the sweep runner, stores each
finished run in the records file as it finishes, then builds the page from that file alone, so
``fedimb bench NAME --from-records`` (no training, no run directories) rebuilds it byte for byte.
"""

from __future__ import annotations

import argparse
import operator
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedimb.config import ConfigError, ExperimentConfig, from_yaml
from fedimb.records import atomic_write_text
from fedimb.report import read_records, record_of_run, run_of_record, write_records

RECORDS = "records.jsonl.gz"
NOTES = "notes.md"


@dataclass(frozen=True)
class Page:
    """A results page and the folder beside it."""

    doc: Path

    @property
    def folder(self) -> Path:
        """``docs/results/NAME/``: records, notes and images."""
        return self.doc.with_suffix("")

    @property
    def records(self) -> Path:
        return self.folder / RECORDS

    def notes(self) -> str:
        """The hand-written notes (``NAME/notes.md``), or ``""``."""
        path = self.folder / NOTES
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def header(self) -> dict[str, Any]:
        """The header stored with the page's records: the command(s) that wrote them, when, where."""
        return read_records(self.records)[0]

    def runs(self) -> list[PageRun]:
        """The sweep runs in the page's records, in their order."""
        return page_runs(read_records(self.records)[1], self.records)

    def write(self, text: str) -> Path:
        self.doc.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(self.doc, text)


def bench_parser(name: str, description: str | None, doc: str) -> argparse.ArgumentParser:
    """The argument parser of ``fedimb bench NAME``, with ``--doc`` and ``--from-records``."""
    parser = argparse.ArgumentParser(prog=f"fedimb bench {name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", default=doc, help="the page to write (its records, notes and images go beside it)")
    parser.add_argument("--from-records", action="store_true",
                        help="train and read nothing else: rebuild the page from its records with the options "
                             "that wrote it (only --doc may be given with it)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any], Page]:
    """Parse ``fedimb bench`` arguments; return them, the page's header and the page.

    With ``--from-records`` the arguments are the ones stored in the page's records and the
    header is theirs; otherwise the header names this command and the present time.
    """
    args = parser.parse_args(argv)
    page = Page(Path(args.doc))
    if not args.from_records:
        command = " ".join([parser.prog, *argv])
        return args, {"command": command, "args": list(argv), "written": time.strftime("%Y-%m-%d %H:%M"),
                      "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}"}, page
    defaults = parser.parse_args([])
    given = [k for k, v in vars(args).items() if k not in ("doc", "from_records") and v != getattr(defaults, k)]
    if given:
        raise ConfigError("--from-records", f"takes only --doc, not {', '.join(given)}: "
                                            "the other options are the ones stored with the records")
    if not page.records.is_file():
        raise ConfigError("--from-records", f"no records beside the page: {page.records}")
    header, _ = read_records(page.records)
    stored = parser.parse_args(header["args"])
    stored.doc, stored.from_records = args.doc, True
    return stored, header, page


def add_option(parser: argparse.ArgumentParser, what: str = "this call's finished runs") -> None:
    """The ``--add`` flag: keep the page's earlier records and add ``what`` to them."""
    parser.add_argument("--add", action="store_true",
                        help=f"add {what} to the page's records (a run of the same name replaces its record) "
                             "instead of recording those runs alone")


def merged_records(kept: list[dict[str, Any]], added: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` with ``added``: an added record takes the place of a kept one of the same name and group
    (so a rerun keeps its row where the page had it), the others are appended in order."""
    def key(record: dict[str, Any]) -> tuple[Any, Any]:
        return record["name"], record.get("group")

    replacing = {key(r): r for r in added}
    merged = [replacing.pop(key(r), r) for r in kept]
    return merged + [r for r in added if key(r) in replacing]


def with_call(kept_header: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """``header`` of a call that adds runs to records written under ``kept_header``: ``calls`` lists every call."""
    return {**header, "calls": [*kept_header.get("calls", [kept_header["command"]]), header["command"]]}


class CallRecords:
    """The records file of a page as one benchmark call leaves it: the page's earlier records (with ``add``)
    and the runs this call finished, written again each time :meth:`keep` is given more, so a call stopped
    part-way keeps the runs it finished (``--from-records`` then rebuilds the page from them)."""

    def __init__(self, page: Page, header: dict[str, Any], add: bool = False) -> None:
        self.page, self.header = page, header
        self.earlier: list[dict[str, Any]] = []
        self.added: list[dict[str, Any]] = []
        if add and page.records.is_file():
            kept_header, self.earlier = read_records(page.records)
            self.header = with_call(kept_header, header)

    def keep(self, run_dirs: list[Path]) -> None:
        """Record these finished runs (a run recorded before by this call is replaced) and write the file."""
        self.added = merged_records(self.added, records_of(run_dirs))
        write_records(self.page.records, self.header, merged_records(self.earlier, self.added))


def store_runs(records: CallRecords, run_dirs: list[Path], failed: list[str], total: int) -> None:
    """Keep the finished runs in the call's records; with none, leave the page and its records as they are."""
    from fedimb.app.sweep import failure

    if not run_dirs:
        if failed:
            raise failure(failed, total, None)
        raise ConfigError("runs", f"none of the {total} chosen runs has finished; {records.page.doc} and its "
                                  "records are left as they are")
    records.keep(run_dirs)


def save_records(page: Page | Path, header: dict[str, Any], records: list[dict[str, Any]],
                 add: bool = False) -> list[dict[str, Any]]:
    """Store ``records`` with the page header (in ``page.records``, or the file given; ``add``: beside the
    records already there, see :func:`merged_records`, and the header lists every call that added runs in
    ``calls``); return them as read back."""
    path = page.records if isinstance(page, Page) else page
    if add and Path(path).is_file():
        kept_header, kept = read_records(path)
        records = merged_records(kept, records)
        header = with_call(kept_header, header)
    write_records(path, header, records)
    return read_records(path)[1]


def records_of(run_dirs: list[Path], **fields: Any) -> list[dict[str, Any]]:
    """The records of finished run directories, in order (``fields`` added to each)."""
    return [record_of_run(run_dir, **fields) for run_dir in run_dirs]


@dataclass
class PageRun:
    """A run as a page sees it: its cell label, its config and what it logged."""

    label: str
    cfg: ExperimentConfig
    run: dict[str, Any]  # run_dir, config, summary, rounds (fedimb.report.run_of_record)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def summary(self) -> dict[str, Any]:
        return self.run["summary"]


def page_runs(records: list[dict[str, Any]], where: Path) -> list[PageRun]:
    """The records of sweep runs (named ``<label>-s<seed>``) as :class:`PageRun` objects, in order."""
    return [PageRun(record["name"].rsplit("-s", 1)[0], from_yaml(record["config"]), run_of_record(record, where))
            for record in records]


def by_label(runs: list[PageRun], labels: list[str]) -> dict[str, list[PageRun]]:
    """The runs of each label in ``labels`` (labels without runs left out), in run order."""
    grouped = {label: [r for r in runs if r.label == label] for label in labels}
    return {label: members for label, members in grouped.items() if members}


# --- markdown pieces ---------------------------------------------------------------------------


def commands_text(header: dict[str, Any]) -> str:
    """The command that wrote a page's records, or each call in order where later ones added runs (``--add``)."""
    return ", then ".join(f"`{call}`" for call in header.get("calls", [header["command"]]))


def command_line(header: dict[str, Any]) -> str:
    """A page's ``Command:`` line (``Commands:`` where several calls wrote its records)."""
    return f"{'Commands' if len(header.get('calls', [])) > 1 else 'Command'}: {commands_text(header)}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def mean_std(values: Any, digits: int = 2) -> str:
    """``"mean ± std"`` (population std) of ``values``, or the value alone when there is one."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) > 1:
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"
    return f"{values.mean():.{digits}f}"


def paired_by_seed(ours: dict[int, float], other: dict[int, float]) -> np.ndarray:
    """Per-seed differences ours − other over the seeds both ran, in seed order."""
    return np.array([ours[s] - other[s] for s in sorted(ours) if s in other])


def paired_text(diffs: Any) -> str:
    """``+m ± s`` of per-seed paired differences, ``(within noise)`` where |mean| < std; ``–`` with none."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if len(diffs) == 0:
        return "–"
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f}"
    mean, std = diffs.mean(), diffs.std()
    return f"{mean:+.2f} ± {std:.2f}" + (" (within noise)" if abs(mean) < std else "")


def noise_note(within: list[str]) -> str:
    """The paragraph naming the comparisons whose paired differences are within noise ('' for none)."""
    if not within:
        return ""
    return ("\n\nWithin noise (|mean| < std of the per-seed paired differences), so these seeds do not settle "
            f"the sign: {'; '.join(within)}.")


def margin_within_noise(diffs: Any, needed: float) -> bool:
    """Whether a floor's margin, mean(diffs) − needed, is smaller than the std of the per-seed paired ``diffs``
    (a floor of 0 is the sign itself: see :func:`paired_text`)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    return needed != 0 and len(diffs) > 1 and abs(diffs.mean() - needed) < diffs.std()


def margin_note(thin: list[str]) -> str:
    """The paragraph naming the floors whose margin (measured − needed) is smaller than the std of their per-seed
    paired differences ('' for none): such a floor holds or fails on these seeds, not beyond their spread."""
    if not thin:
        return ""
    return ("\n\nMargin over the floor within noise (|mean − needed| < std of the per-seed paired differences), "
            f"so these seeds do not settle whether it holds: {'; '.join(thin)}.")


_NEEDS = {">": operator.gt, ">=": operator.ge, "<=": operator.le}


def floors_table(header: list[str], checks: list[tuple[list[str], float, str, float]],
                 signed: bool = True) -> tuple[str, bool]:
    """A table of floors and whether all hold.

    ``checks``: (leading cells, measured, ``">"`` / ``">="`` / ``"<="``, needed) per row; each row
    ends with the measured value (with its sign when ``signed``), the need and ``yes`` / ``no``.
    """
    rows, ok = [], True
    for cells, measured, need, needed in checks:
        holds = bool(_NEEDS[need](measured, needed))
        ok &= holds
        rows.append([*cells, f"{measured:+.2f}" if signed else f"{measured:.2f}", f"{need} {needed:g}",
                     "yes" if holds else "no"])
    return table(header, rows), ok


def floors_verdict(missing: list[str], verdict: str, notes: str) -> str:
    """What a measuring page says after its floors: what its records lack, the verdict, its notes."""
    return ((f"Not measured in these records: {', '.join(missing)}.\n\n" if missing else "")
            + f"All floors hold: {verdict}.\n\n" + (notes if notes else ""))


def floors_section(text: str, ok: bool) -> str:
    """``## Floors``: the floor tables and the one-line verdict."""
    return f"## Floors\n\n{text}\n\nAll floors hold: {'yes' if ok else 'no'}.\n\n"
