"""Prompts from an OpenVidHD CSV: stable ids, filters, and an account of every row that was not used.

OpenVidHD's columns are `video,caption,aesthetic score,motion score,temporal consistency score,camera
motion,frame,fps,seconds`; only `caption` is required. Captions are quoted and may hold commas and
newlines, so a row is a CSV *record*, which can span several lines: rows are numbered from 1 after the
header, and each report also gives the line the record starts on.

A file that is not such a CSV (missing, empty, no `caption` column, a column a filter needs absent)
fails at once with one line (`PromptFileError`). A bad row (wrong number of fields, empty caption,
unreadable score, duplicate video name, no readable duration under `datagen.lengths.mode=source`) is counted and listed with its row number; it never stops the
job. Bytes that are not UTF-8 are read as cp1252 (the usual culprit, e.g. curly quotes from Windows
tools) and those rows are listed as repaired.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from data_pipeline.lengths import DURATION_COLUMNS, LengthError, LengthPlanner
from gd_train.config import ConfigError

OPENVID_COLUMNS = ("video", "caption", "aesthetic score", "motion score", "temporal consistency score",
                   "camera motion", "frame", "fps", "seconds")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATES = re.compile("[\udc80-\udcff]")  # what surrogateescape made of bytes that are not UTF-8
MAX_KEY_LENGTH = 64  # a key plus ".safetensors" must fit the 100-byte name field of a ustar tar header
# A name stable_key keeps as it is: safe characters, no '_' at either end, not too long, one extension.
_PLAIN_NAME = re.compile(r"([A-Za-z0-9-](?:[A-Za-z0-9_-]{0,%d}[A-Za-z0-9-])?)(?:\.[A-Za-z0-9]{1,5})?" % (MAX_KEY_LENGTH - 2))


class PromptFileError(ConfigError):
    """The prompts file as a whole is unusable (one line: file and what was expected)."""


@dataclass(frozen=True, slots=True)  # slots: ~200 bytes less per prompt, 433k of them
class Prompt:
    key: str  # stable id: from the video name (else the row); letters, digits, '_' and '-' only
    caption: str
    row: int  # 1 = first record after the header
    line: int  # line of the file the record starts on
    video: str
    aesthetic_score: Optional[float] = None
    motion_score: Optional[float] = None
    num_frames: Optional[int] = None  # planned clip length (pixel frames); None: video.num_frames


@dataclass(frozen=True)
class BadRow:
    row: int
    line: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} (line {self.line}): {self.reason}"


@dataclass
class PromptReport:
    path: str
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    repaired_rows: list[int] = field(default_factory=list)  # rows with non-UTF-8 bytes, read as cp1252
    filtered: Counter = field(default_factory=Counter)  # reason -> rows dropped by a filter
    kept: int = 0
    length_fallback_rows: list[int] = field(default_factory=list)  # no readable duration, given video.num_frames
    fallback_frames: Optional[int] = None

    def summary_lines(self, max_listed: int = 20) -> list[str]:
        lines = [f"prompts: {self.path}: {self.rows} rows, {self.kept} kept, {len(self.bad_rows)} bad, "
                 f"{sum(self.filtered.values())} filtered"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.filtered.items()))})" if self.filtered else "")]
        if self.bad_rows:
            listed = ", ".join(str(b.row) for b in self.bad_rows[:max_listed])
            more = f" and {len(self.bad_rows) - max_listed} more" if len(self.bad_rows) > max_listed else ""
            lines.append(f"bad rows: {listed}{more}")
            lines += [f"  {bad}" for bad in self.bad_rows[:max_listed]]
        if self.repaired_rows:
            listed = ", ".join(map(str, self.repaired_rows[:max_listed]))
            lines.append(f"rows with non-UTF-8 bytes (read as cp1252): {listed}"
                         + (f" and {len(self.repaired_rows) - max_listed} more" if len(self.repaired_rows) > max_listed else ""))
        fallbacks = self.length_fallback_rows
        if fallbacks:
            lines.append(f"rows without a readable duration, given video.num_frames={self.fallback_frames} "
                         f"(datagen.lengths.on_missing=fixed): {', '.join(map(str, fallbacks[:max_listed]))}"
                         + (f" and {len(fallbacks) - max_listed} more" if len(fallbacks) > max_listed else ""))
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "kept": self.kept, "filtered": dict(self.filtered),
                "bad_rows": [asdict(b) for b in self.bad_rows], "repaired_rows": self.repaired_rows,
                "length_fallback_rows": self.length_fallback_rows}


def stable_key(video: str, row: int) -> str:
    """A shard key from the video name (its stem, made tar- and WebDataset-safe), else from the row.

    Names that had to be altered, or shortened, get a digest of the original appended, so that two
    different names never map to one key."""
    plain = _PLAIN_NAME.fullmatch(video)  # the usual case, e.g. 'abc_123.mp4': the stem as it is
    if plain is not None:
        return plain.group(1)
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", video.strip())
    if not stem:
        return f"row{row:09d}"
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "video"
    if safe == stem and len(safe) <= MAX_KEY_LENGTH:
        return safe
    digest = hashlib.sha1(video.strip().encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe[:MAX_KEY_LENGTH - 11]}-{digest}"


def read_prompts(path: str | Path, filters: Any, lengths: Optional[LengthPlanner] = None
                 ) -> tuple[list[Prompt], PromptReport]:
    """All usable prompts of the CSV in file order, and the report of what was dropped and why.

    `filters` is a `PromptFilters` config section (or anything with its attributes). Its values are read
    once: through OmegaConf an attribute costs microseconds, which at OpenVidHD's 433k rows adds up.
    With `lengths` (the `datagen.lengths` policy) each prompt gets its planned `num_frames`; without it,
    `num_frames` stays None (video.num_frames)."""
    path = Path(path)
    report = PromptReport(path=str(path))
    records = _records(path)
    header = _header(path, records)
    index = {name.strip().lower(): i for i, name in enumerate(header)}
    min_aesthetic, min_motion = filters.min_aesthetic_score, filters.min_motion_score
    dedupe, max_prompts = bool(filters.dedupe_captions), filters.max_prompts
    needed = {"caption": True, "aesthetic score": min_aesthetic is not None, "motion score": min_motion is not None}
    for column, required in needed.items():
        if required and column not in index:
            why = "the column every prompt comes from" if column == "caption" else "a filter needs it"
            raise PromptFileError(f"prompts_csv '{path}': no '{column}' column ({why}); header has "
                                  f"{_preview(header)}; expected OpenVidHD's columns {','.join(OPENVID_COLUMNS)}")
    duration_columns: dict[str, int] = {}
    if lengths is not None and lengths.reads_rows:
        duration_columns = {c: index[c] for c in DURATION_COLUMNS if c in index}
        if "seconds" not in duration_columns and not {"frame", "fps"} <= set(duration_columns):
            raise PromptFileError(f"prompts_csv '{path}': no 'seconds' column and no 'frame' and 'fps' columns "
                                  f"(datagen.lengths.mode=source reads each clip's duration from them); header has "
                                  f"{_preview(header)}")
        report.fallback_frames = lengths.default_frames
    n_fields = len(header)
    i_caption, i_video = index["caption"], index.get("video")
    i_aesthetic, i_motion = index.get("aesthetic score"), index.get("motion score")

    prompts: list[Prompt] = []
    seen_keys: dict[str, int] = {}
    seen_captions: set[str] = set()
    filtered = report.filtered
    # Hundreds of thousands of long-lived objects, none in a cycle: the cyclic collector would rescan
    # them all again and again as the lists grow (a third of the time), for nothing to collect.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for row, line, end_line, fields, repaired, error in records:
            report.rows += 1
            if repaired:
                report.repaired_rows.append(row)
            # A stray quote makes one record swallow the lines after it: the span shows which.
            if error is not None:
                report.bad_rows.append(BadRow(row, line, error + _span(line, end_line)))
                continue
            if len(fields) != n_fields:
                report.bad_rows.append(BadRow(row, line, f"{len(fields)} fields, expected {n_fields} "
                                                         f"({','.join(h.strip() for h in header)}){_span(line, end_line)}"))
                continue
            caption = fields[i_caption]
            if not caption.isascii() or not caption.isprintable():
                caption = _CONTROL_CHARS.sub("", caption)
            caption = " ".join(caption.split())
            if not caption:
                report.bad_rows.append(BadRow(row, line, "empty caption"))
                continue
            try:
                aesthetic = _score(fields, i_aesthetic, "aesthetic score", min_aesthetic is not None)
                motion = _score(fields, i_motion, "motion score", min_motion is not None)
            except ValueError as exc:
                report.bad_rows.append(BadRow(row, line, str(exc)))
                continue
            video = fields[i_video].strip() if i_video is not None else ""
            key = stable_key(video, row)
            if key in seen_keys:
                report.bad_rows.append(BadRow(row, line, f"video '{video}' (key '{key}') already at row {seen_keys[key]}"))
                continue
            num_frames = None
            if lengths is not None:
                try:
                    num_frames, fell_back = lengths.choose(key, {c: fields[i] for c, i in duration_columns.items()})
                except LengthError as exc:
                    report.bad_rows.append(BadRow(row, line, str(exc)))
                    continue
                if fell_back:
                    report.length_fallback_rows.append(row)
            seen_keys[key] = row

            if min_aesthetic is not None and aesthetic < min_aesthetic:
                filtered["aesthetic score"] += 1
            elif min_motion is not None and motion < min_motion:
                filtered["motion score"] += 1
            elif dedupe and caption in seen_captions:
                filtered["duplicate caption"] += 1
            elif max_prompts is not None and len(prompts) >= max_prompts:
                filtered["max_prompts"] += 1
            else:
                if dedupe:
                    seen_captions.add(caption)
                prompts.append(Prompt(key, caption, row, line, video, aesthetic, motion, num_frames))
    finally:
        if gc_was_enabled:
            gc.enable()
    report.kept = len(prompts)
    return prompts, report


def _span(line: int, end_line: int) -> str:
    return f", spans lines {line}-{end_line}" if end_line > line else ""


def _score(fields: list[str], i: Optional[int], column: str, required: bool) -> Optional[float]:
    text = fields[i].strip() if i is not None else ""
    if not text:
        if required:
            raise ValueError(f"empty '{column}' (a filter needs it)")
        return None
    try:
        return float(text)
    except ValueError:
        if required:
            raise ValueError(f"'{column}' is {text[:40]!r}, not a number") from None
        return None


Record = tuple[int, int, int, list[str], bool, Optional[str]]  # row, first/last line, fields, repaired, error


def _records(path: Path) -> Iterator[Record]:
    """CSV records with row and line numbers. Decoding is done per record (not per file) so that a
    stray byte costs one repaired row, not the file."""
    if not path.is_file():
        raise PromptFileError(f"prompts_csv '{path}': no such file (expected an OpenVidHD-layout CSV with a "
                              "'caption' column)")
    # surrogateescape keeps undecodable bytes through the csv module; they are re-decoded below.
    handle = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    return _iterate(handle)


def _iterate(handle: io.TextIOBase) -> Iterator[Record]:
    with handle:
        # strict: a quote that closes a field must be followed by a comma or the line end. Without it a
        # stray quote silently merges the following rows into one caption; with it that is an error.
        reader = csv.reader(handle, strict=True)
        record, start_line = 0, 1  # record 0 is the header
        while True:
            try:
                fields, error = next(reader), None
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a NUL byte; the reader carries on with the next line
                fields, error = [], f"not parseable as CSV ({exc})"
            if fields or error:  # the csv module yields [] for a blank line: not a row
                repaired = not all(map(str.isascii, fields)) and any(map(_SURROGATES.search, fields))
                yield (record, start_line, reader.line_num, [_redecode(f) for f in fields] if repaired else fields,
                       repaired, error)
                record += 1
            start_line = reader.line_num + 1


def _header(path: Path, records: Iterator[Record]) -> list[str]:
    try:
        _, _, _, header, _, error = next(records)
    except StopIteration:
        raise PromptFileError(f"prompts_csv '{path}': empty file (expected a header row with a 'caption' column)") from None
    if error is not None or not header:
        raise PromptFileError(f"prompts_csv '{path}': first row is not a CSV header ({error or 'empty'})")
    if any("\x00" in name or _has_surrogates(name) for name in header):
        raise PromptFileError(f"prompts_csv '{path}': binary data, not a CSV (expected OpenVidHD's columns "
                              f"{','.join(OPENVID_COLUMNS)})")
    return header


def _has_surrogates(text: str) -> bool:
    return _SURROGATES.search(text) is not None


def _redecode(text: str) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    return raw.decode("cp1252", errors="replace")


def _preview(header: list[str]) -> str:
    text = ",".join(header)
    return repr(text if len(text) <= 80 else text[:77] + "...")
