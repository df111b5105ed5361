"""OpenVidHD CSV reading: quoting, encodings, bad rows counted with row numbers, filters, stable keys,
and one-line failures for files that are not such a CSV."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from datagen_utils import OPENVID_HEADER, REPO_ROOT, write_prompts_csv
from gd_train.data.shards import KEY_RE

sys.path.insert(0, str(REPO_ROOT))
from data_pipeline.prompts import MAX_KEY_LENGTH, PromptFileError, read_prompts, stable_key  # noqa: E402

NO_FILTERS = SimpleNamespace(min_aesthetic_score=None, min_motion_score=None, dedupe_captions=False, max_prompts=None)


def filters(**kw):
    return SimpleNamespace(**{**vars(NO_FILTERS), **kw})


def csv_file(tmp_path: Path, *rows: bytes, header: bytes = OPENVID_HEADER) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_bytes(header + b"\n".join(rows) + b"\n")
    return path


def row(video: str, caption: bytes, aesthetic: str = "5.0", motion: str = "3.0") -> bytes:
    return video.encode() + b',"' + caption + b'",' + f"{aesthetic},{motion},0.9,static,81,16,5".encode()


def test_quoted_captions_with_commas_and_newlines_keep_row_and_line_numbers(tmp_path):
    path = csv_file(tmp_path, row("a.mp4", b"one, two\nthree"), row("b.mp4", b'say ""hi""'), b"",
                    row("c.mp4", b"plain"))
    prompts, report = read_prompts(path, NO_FILTERS)
    assert [(p.key, p.caption, p.row, p.line) for p in prompts] == [
        ("a", "one, two three", 1, 2), ("b", 'say "hi"', 2, 4), ("c", "plain", 3, 6)]  # the blank line is no row
    assert report.rows == 3 and not report.bad_rows


def test_bad_rows_are_counted_with_row_numbers_and_never_fatal(tmp_path):
    path = csv_file(tmp_path,
                    row("ok1.mp4", b"fine"),
                    b"short.mp4,two fields",
                    row("empty.mp4", b"  \n "),
                    b"long.mp4,a,b,c,d,e,f,g,h,i",
                    row("ok1.mp4", b"same video again"),
                    row("ok2.mp4", b"fine too"))
    prompts, report = read_prompts(path, NO_FILTERS)
    assert [p.key for p in prompts] == ["ok1", "ok2"]
    assert [(b.row, b.line) for b in report.bad_rows] == [(2, 3), (3, 4), (4, 6), (5, 7)]
    reasons = [b.reason for b in report.bad_rows]
    assert reasons[0].startswith("2 fields, expected 9") and reasons[1] == "empty caption"
    assert reasons[2].startswith("10 fields") and "already at row 1" in reasons[3]
    lines = report.summary_lines()
    assert lines[0].endswith("6 rows, 2 kept, 4 bad, 0 filtered") and lines[1] == "bad rows: 2, 3, 4, 5"


def test_a_stray_quote_is_reported_with_the_lines_it_swallowed(tmp_path):
    path = csv_file(tmp_path, row("a.mp4", b"fine"), b'b.mp4,"unterminated,5,3,1,x,81,16,5',
                    row("c.mp4", b"swallowed"), row("d.mp4", b"swallowed too"))
    prompts, report = read_prompts(path, NO_FILTERS)
    assert [p.key for p in prompts] == ["a", "d"]  # c went down with b, and the report says so
    assert [(b.row, b.line) for b in report.bad_rows] == [(2, 3)]
    assert report.bad_rows[0].reason.startswith("not parseable as CSV (")
    assert report.bad_rows[0].reason.endswith("spans lines 3-4")


def test_non_utf8_bytes_are_read_as_cp1252_and_listed(tmp_path):
    path = csv_file(tmp_path, row("a.mp4", b"caf\xe9 \x93quoted\x94"), row("b.mp4", "naïve ünïcode".encode()))
    prompts, report = read_prompts(path, NO_FILTERS)
    assert [p.caption for p in prompts] == ["café “quoted”", "naïve ünïcode"]
    assert report.repaired_rows == [1]


def test_utf8_bom_in_the_header_is_not_part_of_a_column_name(tmp_path):
    path = csv_file(tmp_path, row("a.mp4", b"fine"), header=b"\xef\xbb\xbf" + OPENVID_HEADER)
    assert [p.key for p in read_prompts(path, NO_FILTERS)[0]] == ["a"]


def test_filters_apply_in_order_and_are_counted(tmp_path):
    path = csv_file(tmp_path,
                    row("low.mp4", b"ugly", aesthetic="3.9"),
                    row("still.mp4", b"static", motion="0.5"),
                    row("a.mp4", b"first"),
                    row("b.mp4", b"first"),  # duplicate caption
                    row("c.mp4", b"second"),
                    row("d.mp4", b"third"),
                    row("bad.mp4", b"score", aesthetic="n/a"))
    prompts, report = read_prompts(path, filters(min_aesthetic_score=4.0, min_motion_score=1.0,
                                                 dedupe_captions=True, max_prompts=2))
    assert [p.key for p in prompts] == ["a", "c"]
    assert dict(report.filtered) == {"aesthetic score": 1, "motion score": 1, "duplicate caption": 1,
                                     "max_prompts": 1}
    assert [(b.row, b.reason) for b in report.bad_rows] == [(7, "'aesthetic score' is 'n/a', not a number")]
    assert prompts[0].aesthetic_score == 5.0 and prompts[0].motion_score == 3.0


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"video,text,fps\nv.mp4,hello,16\n", "no 'caption' column (the column every prompt comes from)"),
    (b"\x00\x01binary\xff\xfe,stuff\n", "binary data, not a CSV"),
])
def test_a_file_that_is_not_an_openvid_csv_fails_in_one_line(tmp_path, content, message):
    path = tmp_path / "prompts.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PromptFileError) as err:
        read_prompts(path, NO_FILTERS)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_filter_on_a_missing_column_fails_at_start(tmp_path):
    path = csv_file(tmp_path, b"v.mp4,hello", header=b"video,caption\n")
    assert len(read_prompts(path, NO_FILTERS)[0]) == 1  # caption alone is enough
    with pytest.raises(PromptFileError, match="no 'motion score' column \\(a filter needs it\\)"):
        read_prompts(path, filters(min_motion_score=1.0))


def test_stable_keys_are_tar_safe_unique_and_derived_from_the_video_name():
    assert stable_key("abc_123-x.mp4", 5) == "abc_123-x"
    assert stable_key("", 42) == "row000000042"
    odd = [stable_key(v, 1) for v in ("a b.mp4", "a_b.mp4", "a.b.c.mp4", "ü/ß.mp4", "x" * 300 + ".mp4", "y" * 300)]
    assert len(set(odd)) == len(odd)
    for key in odd:
        assert KEY_RE.match(key) and len(key) <= MAX_KEY_LENGTH
        assert len((key + ".safetensors").encode()) <= 100  # ustar name field
    assert stable_key("a b.mp4", 1) == stable_key("a b.mp4", 99)  # the row does not matter when there is a name


def test_the_test_csv_of_the_job_tests_reads_as_described(tmp_path):
    expected, bad_rows = write_prompts_csv(tmp_path / "p.csv")
    prompts, report = read_prompts(tmp_path / "p.csv", filters(dedupe_captions=True))
    assert {p.key: p.caption for p in prompts} == expected
    assert [b.row for b in report.bad_rows] == bad_rows


def test_the_bundled_demo_csv_reads_cleanly():
    prompts, report = read_prompts(REPO_ROOT / "assets" / "demo_prompts.csv", filters(dedupe_captions=True))
    assert len(prompts) == 36 and not report.bad_rows and not report.repaired_rows


def test_plain_names_keep_their_stem_and_edge_names_still_get_a_digest():
    # The fast path for ordinary names (e.g. 'abc_123.mp4') must agree with the general rule at its edges.
    assert stable_key("x" * 64 + ".mp4", 1) == "x" * 64
    assert stable_key("x" * 65 + ".mp4", 1).startswith("x" * 53 + "-")
    for name in ("_abc.mp4", "abc_.mp4", "a..mp4", "a.b.mp4", " abc.mp4", "abc.toolongext"):
        key = stable_key(name, 1)
        assert KEY_RE.match(key) and key != name.rsplit(".", 1)[0], name
    assert stable_key("a-b_c", 1) == "a-b_c" and stable_key("abc.toolongext", 1).startswith("abc_toolongext-")


def test_control_characters_and_tabs_are_removed_from_ascii_and_unicode_captions(tmp_path):
    path = csv_file(tmp_path, row("a.mp4", b"tab\there \x01bell\x07"), row("b.mp4", "ünï\x02code\tok".encode()))
    prompts, _ = read_prompts(path, NO_FILTERS)
    assert [p.caption for p in prompts] == ["tab here bell", "ünïcode ok"]


@pytest.mark.parametrize("storage_dtype, hint", [("float32", True), ("bfloat16", False)])
def test_the_disk_refusal_suggests_bfloat16_only_when_the_config_stores_float32(tmp_path, storage_dtype, hint):
    from data_pipeline.gen_teacher import check_free_disk
    from gd_train.config import ConfigError, load_config

    cfg = load_config(REPO_ROOT / "configs" / "datagen.yaml", [f"datagen.storage_dtype={storage_dtype}",
                                                               "datagen.min_free_disk_gb=1e9"])
    with pytest.raises(ConfigError) as err:
        check_free_disk(cfg, tmp_path, {6: 36})
    assert ("datagen.storage_dtype=bfloat16" in str(err.value)) is hint
    assert "free space" in str(err.value) and "\n" not in str(err.value)
