"""Unit tests of the fetch stage's libraries: parsing, stripping, splitting, safety."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.domain import FULL_SPLIT_SIZES, GROUPS
from pipeline.errors import PipelineError
from pipeline.schemas import Documents, validate
from pipeline.sources import bydate
from pipeline.sources.bydate import (
    Source,
    author_of,
    check_post,
    normalise_subject,
    parse_archive,
    resolve_source,
    strip_texts,
    subject_of,
    thread_keys,
    verify_archive,
)
from pipeline.sources.documents import build_table, content_digest, make_report, subsample
from pipeline.splits import (
    assign_validation,
    assign_validation_by_thread,
    assign_validation_latest,
    author_thread_groups,
    check_groups,
    overlap_with_train,
    pick_threads,
)
from tests.helpers import build_archive, default_section, make_post

PARAMS = default_section(
    "data",
    url="https://example.org/archive.tar.gz",
    url_sha256="0" * 64,
)


@pytest.fixture(scope="module")
def raw(tiny_archive: tuple[Path, str]) -> pd.DataFrame:
    return parse_archive(tiny_archive[0], progress=False)


def test_parse_reads_every_post_with_labels_and_latin1(raw: pd.DataFrame) -> None:
    assert len(raw) == 20 * 9
    assert (raw["split"] == "test").sum() == 20 * 3
    assert list(raw.columns) == ["id", "split", "label", "label_name", "text"]
    assert raw["id"].is_monotonic_increasing and raw["id"].is_unique
    row = raw[raw["id"] == "train/sci.med/23000"].iloc[0]
    assert row["label"] == GROUPS.index("sci.med") == 13
    assert row["text"] == make_post(13, 0)
    assert "Université" in row["text"]  # decoded as latin-1, not mangled
    validate(raw, Documents, "tiny")  # a parsed archive satisfies the schema


def test_content_digest_ignores_packing(tmp_path: Path, raw: pd.DataFrame) -> None:
    flat = tmp_path / "flat.tar.gz"  # sklearn's archive has no top folder
    build_archive(flat, top=None)
    other = parse_archive(flat, progress=False)
    assert content_digest(other) == content_digest(raw)
    changed = other.copy()
    changed.loc[0, "text"] += "!"
    assert content_digest(changed) != content_digest(raw)


def test_strip_matches_sklearn_semantics() -> None:
    post = pd.Series([make_post(0, 1)])
    assert strip_texts(post, []).iloc[0] == post.iloc[0]
    no_headers = strip_texts(post, ["headers"]).iloc[0]
    assert "From:" not in no_headers and "Subject:" not in no_headers
    assert no_headers.startswith("In article")
    no_footer = strip_texts(post, ["footers"]).iloc[0]
    assert "signature line" not in no_footer and "Café" in no_footer
    no_quotes = strip_texts(post, ["quotes"]).iloc[0]
    assert "> an earlier opinion" not in no_quotes and "writes:" not in no_quotes
    assert "I think" in no_quotes


def test_validation_split_is_seeded_stratified_and_from_train(raw: pd.DataFrame) -> None:
    a = assign_validation(raw, 0.34, seed=1)
    b = assign_validation(raw, 0.34, seed=1)
    c = assign_validation(raw, 0.34, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    per_class = a[a["split"] == "validation"].groupby("label").size()
    assert per_class.to_dict() == {label: 2 for label in range(20)}  # round(0.34 * 6)
    assert (a.loc[raw["split"] == "test", "split"] == "test").all()  # test never moves


def test_subsample_caps_each_split_and_class(raw: pd.DataFrame) -> None:
    df = subsample(assign_validation(raw, 0.34, seed=0), 2, seed=0)
    counts = df.groupby(["split", "label"]).size()
    assert counts.max() == 2 and len(counts) == 60
    assert subsample(raw, None, seed=0) is raw


def test_build_table_drops_posts_left_empty(raw: pd.DataFrame) -> None:
    only_headers = raw.copy()
    only_headers.loc[0, "text"] = "From: a@b.c\nSubject: nothing\n\n   \n"
    params = PARAMS.model_copy(update={"remove": ["headers"]})
    df, keys, dropped = build_table(only_headers, params, seed=0)
    threads = keys["thread"]
    assert dropped == 1 and len(df) == len(raw) - 1
    assert list(df["split"].drop_duplicates()) == ["train", "validation", "test"]
    assert list(df.columns) == ["id", "split", "label", "label_name", "text"]
    validate(df, Documents, "built")
    df2, keys2, _ = build_table(only_headers, params, seed=0)
    pd.testing.assert_frame_equal(df, df2)
    pd.testing.assert_frame_equal(keys, keys2)
    # Threads come from the raw Subject, although `remove` stripped the headers.
    assert "Subject:" not in df["text"].iloc[0]
    assert threads.iloc[0].startswith("thread alt.atheism question ")


def test_schema_reports_every_failure_at_once(raw: pd.DataFrame) -> None:
    bad = raw.copy()
    bad.loc[0, "label"] = 25
    bad.loc[1, "split"] = "dev"
    bad.loc[2, "text"] = ""
    bad.loc[4, "id"] = bad.loc[3, "id"]
    with pytest.raises(PipelineError) as err:
        validate(bad, Documents, "bad.parquet")
    message = str(err.value)
    assert message.startswith("bad.parquet: failed")
    for expected in ("label:", "split:", "text:", "id: field_uniqueness", "label_name"):
        assert expected in message, expected


def test_schema_checks_full_split_sizes(raw: pd.DataFrame) -> None:
    with pytest.raises(PipelineError, match=r"split sizes .*'test': 60.*expected .*7532"):
        validate(raw, Documents, "tiny", FULL_SPLIT_SIZES)


def test_test_rows_cannot_be_relabelled_as_train(raw: pd.DataFrame) -> None:
    leaked = raw.copy()
    leaked.loc[leaked["split"] == "test", "split"] = "validation"
    with pytest.raises(PipelineError, match="test documents must come from"):
        validate(leaked, Documents, "leaked")


def _archive_with(tmp_path: Path, info: tarfile.TarInfo) -> Path:
    path = tmp_path / "evil.tar.gz"
    build_archive(path, n_train=1, n_test=1, extra=[info])
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("20news-bydate/../../etc/evil", tarfile.REGTYPE, "unsafe archive member"),
        ("/etc/evil", tarfile.REGTYPE, "unsafe archive member"),
        ("20news-bydate/20news-bydate-train/sci.med/link", tarfile.SYMTYPE, "unsafe archive"),
        ("20news-bydate/20news-bydate-train/sci.med/hard", tarfile.LNKTYPE, "unsafe archive"),
        ("20news-bydate/dev", tarfile.CHRTYPE, "unsafe archive member"),
    ],
)
def test_unsafe_members_are_rejected(tmp_path: Path, name: str, kind: bytes, message: str):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "20news-bydate/20news-bydate-train/sci.med/23000"
    with pytest.raises(PipelineError, match=message):
        parse_archive(_archive_with(tmp_path, info), progress=False)


def test_absurd_member_size_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    info = tarfile.TarInfo("20news-bydate/20news-bydate-train/sci.med/99999")
    info.size = 4096
    path = _archive_with(tmp_path, info)
    monkeypatch.setattr(bydate, "MAX_MEMBER_BYTES", 2048)  # real posts here are < 1 KB
    with pytest.raises(PipelineError, match="4096 bytes .limit 2048."):
        parse_archive(path, progress=False)


def test_corrupt_truncated_and_wrong_archives(tmp_path: Path, tiny_archive) -> None:
    data = tiny_archive[0].read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not an archive" * 100)
    wrong = tmp_path / "wrong.tar.gz"
    with tarfile.open(wrong, "w:gz") as tar:
        tar.add(__file__, arcname="notes/readme.txt")
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        parse_archive(truncated, progress=False)
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        parse_archive(garbage, progress=False)
    with pytest.raises(PipelineError, match="wrong archive"):
        parse_archive(wrong, progress=False)
    plain = tmp_path / "plain.tar"
    plain.write_bytes(gzip.decompress(data))  # an uncompressed tar works too
    assert len(parse_archive(plain, progress=False)) == 180


def test_verify_archive(tmp_path: Path, tiny_archive: tuple[Path, str]) -> None:
    path, sha = tiny_archive
    assert verify_archive(Source(path, "test", sha)) == sha
    with pytest.raises(PipelineError, match="checksum mismatch: expected sha256 0{64}"):
        verify_archive(Source(path, "test", "0" * 64))
    with pytest.raises(PipelineError, match="unknown archive sha256"):
        verify_archive(Source(path, "test", None))
    with pytest.raises(PipelineError, match="missing.tar.gz .from test.: archive not found"):
        verify_archive(Source(tmp_path / "missing.tar.gz", "test", None))


def test_source_precedence_env_then_param_then_download(tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"archive": "param.tar.gz"})
    env = {"NEWSGROUPS_ARCHIVE": "/env.tar.gz", "NEWSGROUPS_ARCHIVE_SHA256": "a" * 64}
    assert resolve_source(params, env) == Source(
        Path("/env.tar.gz"), "$NEWSGROUPS_ARCHIVE", "a" * 64
    )
    assert resolve_source(params, {}).path == Path("param.tar.gz")
    download = resolve_source(PARAMS, {"XDG_CACHE_HOME": str(tmp_path)})
    assert download.download_url == PARAMS.url and download.sha256 == PARAMS.url_sha256
    assert download.path.parent == tmp_path / "newsgroups-pipeline"


# --- validation schemes: data.validation = thread | latest | random -----------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Hello World", "hello world"),
        ("RE: re:  Fwd: FW:  The   Topic  ", "the topic"),
        ("Re[2]: Pinouts", "pinouts"),
        ("Re^2: ATM", "atm"),
        ("Re : spacing", "spacing"),
        ("Fwd:Re:no spaces", "no spaces"),
        ("Re-inventing Crypto Policy", "re-inventing crypto policy"),  # not a prefix
        ("Reply to all", "reply to all"),
        ("A question, Re: nothing", "a question, re: nothing"),  # only leading prefixes
        ("\tMixed\tWHITE  space ", "mixed white space"),
        ("Re:", ""),
        ("   ", ""),
        (None, ""),
    ],
)
def test_normalise_subject(subject: str | None, expected: str) -> None:
    assert normalise_subject(subject) == expected


def test_subject_is_read_from_the_header_block_only() -> None:
    assert subject_of("From: a@b\nSubject: Re: cars\nLines: 2\n\nbody") == " Re: cars"
    assert subject_of("SUBJECT: shouting\n\nbody") == " shouting"
    folded = "From: a\nSubject: a long\n  folded subject\nLines: 1\n\nx"
    assert normalise_subject(subject_of(folded)) == "a long folded subject"
    assert subject_of("From: a@b\n\n> Subject: quoted in the body\n") is None
    assert subject_of("From: a@b\nLines: 1\n\nno subject here") is None


def _post(subject: str | None) -> str:
    header = "" if subject is None else f"Subject: {subject}\n"
    return f"From: someone@example.edu\n{header}Lines: 1\n\nbody text\n"


def _threaded(
    sizes: dict[int, list[int]], origin: str = "train", start: int = 1000
) -> pd.DataFrame:
    """A documents table: for each label, threads of the given sizes (a Re: chain each)."""
    rows = []
    for label, thread_sizes in sizes.items():
        number = start
        for t, size in enumerate(thread_sizes):
            for r in range(size):
                subject = ("Re: " * r) + f"Topic {t} of {label}"
                rows.append((f"{origin}/{GROUPS[label]}/{number}", origin, label, _post(subject)))
                number += 1
    df = pd.DataFrame(rows, columns=["id", "split", "label", "text"])
    df.insert(3, "label_name", df["label"].map(lambda i: GROUPS[i]))
    return df.sort_values("id", ignore_index=True)


# Every class: 40 posts in threads of 1 to 5; class 3 is one thread of 60 posts plus 12 others.
MIXED = {label: [1, 2, 3, 5, 1, 1, 4, 2, 1, 3, 2, 1, 1, 5, 3, 1] for label in range(20)}
MIXED[3] = [60, *[1] * 12]


def test_thread_keys_group_replies_and_keep_subjectless_posts_apart() -> None:
    df = pd.DataFrame(
        {
            "id": ["train/sci.med/1", "train/sci.med/2", "train/sci.space/3", "train/sci.med/4"],
            "label_name": ["sci.med", "sci.med", "sci.space", "sci.med"],
            "text": [_post("Vitamin C"), _post("RE: re: vitamin  c"), _post("Vitamin C"), ""],
        }
    )
    df.loc[4] = ["train/sci.med/5", "sci.med", _post(None)]
    df.loc[5] = ["train/sci.med/6", "sci.med", _post("Re:")]
    keys = thread_keys(df).tolist()
    assert keys[0] == keys[1] == "thread sci.med vitamin c"
    assert keys[2] == "thread sci.space vitamin c"  # the same Subject in another group
    assert keys[3:] == ["post train/sci.med/4", "post train/sci.med/5", "post train/sci.med/6"]


def test_thread_split_keeps_threads_whole_and_every_class_on_both_sides() -> None:
    df = _threaded(MIXED)
    threads = thread_keys(df)
    split = assign_validation_by_thread(df, threads, 0.1, seed=3)["split"]
    train, val = set(threads[split == "train"]), set(threads[split == "validation"])
    assert val and not train & val  # no thread in two splits
    per_class = split.groupby(df["label"]).value_counts().unstack(fill_value=0)
    assert (per_class["train"] > 0).all() and (per_class["validation"] > 0).all()
    assert len(per_class) == 20
    # about 10% of each class's posts: 4 of 40 (a greedy fill reaches the target exactly)
    assert per_class.drop(index=3)["validation"].eq(4).all()


def test_thread_split_is_seeded() -> None:
    df = _threaded(MIXED)
    threads = thread_keys(df)
    a = assign_validation_by_thread(df, threads, 0.1, seed=1)
    pd.testing.assert_frame_equal(a, assign_validation_by_thread(df, threads, 0.1, seed=1))
    assert not a["split"].equals(assign_validation_by_thread(df, threads, 0.1, seed=2)["split"])


def test_a_class_dominated_by_one_thread_validates_on_its_other_threads() -> None:
    df = _threaded(MIXED)
    threads = thread_keys(df)
    for seed in range(5):
        split = assign_validation_by_thread(df, threads, 0.1, seed)["split"]
        huge = threads == "thread comp.sys.ibm.pc.hardware topic 0 of 3"
        assert huge.sum() == 60 and (split[huge] == "train").all()
        assert (split[df["label"] == 3] == "validation").sum() == 7  # round(0.1 * 72)


def test_pick_threads_edge_cases() -> None:
    rng = np.random.default_rng(0)
    assert pick_threads(np.array([9]), 1, rng) == []  # one thread: it cannot be split
    assert pick_threads(np.array([3, 2]), 0, rng) == []
    assert pick_threads(np.array([5, 3, 4]), 1, rng) == [1]  # all too big: the smallest
    chosen = pick_threads(np.array([1, 1, 1, 1, 1, 1]), 1, rng)
    assert len(chosen) == 1


def test_tiny_classes_as_on_the_smoke_archive(raw: pd.DataFrame) -> None:
    # 6 train posts per class, each its own thread: one thread (one post) per class moves.
    threads = thread_keys(raw)
    split = assign_validation_by_thread(raw, threads, 0.1, seed=0)["split"]
    assert split[split == "validation"].groupby(raw["label"]).size().eq(1).all()
    # A class whose train posts form a single thread cannot be split: fetch says so.
    one_thread = raw.copy()
    sci_med = (one_thread["label_name"] == "sci.med") & (one_thread["split"] == "train")
    one_thread.loc[sci_med, "text"] = _post("Re: the only thread")
    with pytest.raises(PipelineError) as err:
        build_table(one_thread, PARAMS, seed=0)
    message = str(err.value)
    assert "validation lacks 1 of 20: sci.med" in message
    assert "data.validation=thread can split a group only when it has at least 2 threads" in (
        message
    )
    random = PARAMS.model_copy(update={"validation": "random"})
    assert (build_table(one_thread, random, seed=0)[0]["split"] == "validation").sum() == 20


def test_latest_takes_the_highest_message_numbers() -> None:
    df = _threaded({0: [1] * 10, 5: [1] * 30})
    # message numbers out of id order: 999 sorts before 1000 as text but is older
    df.loc[df["id"] == "train/alt.atheism/1000", "id"] = "train/alt.atheism/999"
    split = assign_validation_latest(df, 0.2)["split"]
    val = sorted(df.loc[split == "validation", "id"])
    assert val == [
        "train/alt.atheism/1008",
        "train/alt.atheism/1009",
        *[f"train/comp.windows.x/{n}" for n in range(1024, 1030)],
    ]
    bad = df.copy()
    bad.loc[0, "id"] = "train/alt.atheism/12a"
    with pytest.raises(PipelineError, match="train/alt.atheism/12a has no numeric message"):
        assign_validation_latest(bad, 0.2)


def test_report_gives_the_scheme_and_thread_overlap_with_train(raw: pd.DataFrame) -> None:
    df = pd.DataFrame(
        {"split": ["train", "train", "validation", "validation", "test", "test", "test", "test"]}
    )
    threads = pd.Series(["a", "b", "a", "c", "b", "b", "d", "e"])
    assert overlap_with_train(df, threads) == {"validation": 0.5, "test": 0.5}
    for scheme in ("thread", "latest", "random"):
        params = PARAMS.model_copy(update={"validation": scheme})
        table, keys, dropped = build_table(raw, params, seed=0)
        report = make_report(table, keys, raw, "0" * 64, params, dropped)
        assert report["validation_scheme"] == scheme
        overlap = report["thread_overlap_with_train"]
        assert set(overlap) == {"validation", "test"}
        # tiny archive: test posts k=0..2 reuse the Subjects of train posts k=0..2
        assert 0 < overlap["test"] <= 1
        if scheme == "thread":
            assert overlap["validation"] == 0.0
        assert set(report["author_overlap_with_train"]) == {"validation", "test"}


def test_author_of_reads_the_from_address() -> None:
    assert author_of("From: Jo Doe <JO@Example.EDU>\nSubject: x\n\nbody") == "jo@example.edu"
    assert author_of("From: jo@a.b (Jo)\n\nFrom: other@c.d") == "jo@a.b"  # headers only
    assert author_of("From: Jo Doe\n\n") == "jo doe"
    assert author_of("Subject: none\n\n") == ""


def test_author_thread_groups_join_threads_through_their_authors() -> None:
    threads = pd.Series(["t1", "t1", "t2", "t3", "t4", "t4"])
    authors = pd.Series(["ann", "bob", "bob", "cy", "", ""])
    groups = author_thread_groups(threads, authors).tolist()
    assert groups[:3] == ["t1", "t1", "t1"]  # t2 joins t1 through bob
    assert groups[3:] == ["t3", "t4", "t4"]  # no author: the thread alone


def _authored(n_authors: int = 150, seed: int = 0) -> pd.DataFrame:
    """Train posts of two classes: 40 threads each, every post by one of a few authors."""
    rng = np.random.default_rng(seed)
    rows, number = [], 1000
    for label in (0, 1):
        for t in range(40):
            for r in range(int(rng.integers(1, 4))):
                author = f"a{int(rng.integers(0, n_authors))}.{label}@x.edu"
                text = f"From: {author}\nSubject: {'Re: ' * r}topic {t}\n\nbody\n"
                rows.append((f"train/{GROUPS[label]}/{number}", "train", label, text))
                number += 1
    df = pd.DataFrame(rows, columns=["id", "split", "label", "text"])
    df.insert(3, "label_name", df["label"].map(lambda i: GROUPS[i]))
    return df


def test_new_author_share_moves_some_authors_with_their_threads() -> None:
    df = _authored()
    threads = thread_keys(df)
    authors = pd.Series([author_of(t) for t in df["text"]], index=df.index)
    plain = assign_validation_by_thread(df, threads, 0.2, seed=0)
    same = assign_validation_by_thread(df, threads, 0.2, seed=0, authors=authors)
    pd.testing.assert_frame_equal(plain, same)  # share 0: exactly the thread scheme
    mixed = assign_validation_by_thread(df, threads, 0.2, 0, authors, new_author_share=0.5)
    split = mixed["split"]
    assert not set(threads[split == "train"]) & set(threads[split == "validation"])
    unseen = ~authors[split == "validation"].isin(set(authors[split == "train"]))
    assert unseen.sum() > 0 and unseen.mean() > 0.2
    plain_unseen = ~authors[plain["split"] == "validation"].isin(
        set(authors[plain["split"] == "train"])
    )
    assert unseen.mean() > plain_unseen.mean()
    again = assign_validation_by_thread(df, threads, 0.2, 0, authors, new_author_share=0.5)
    pd.testing.assert_frame_equal(mixed, again)


# --- strict data: what fetch refuses ------------------------------------------------------


def test_check_post_accepts_text_with_stray_controls() -> None:
    # Real posts hold backspace overstrikes and ^B signature art (7.4% of one post's bytes).
    overstrike = b"Subject: x\n\n" + b"_\x08A_\x08d_\x08v" * 10 + b" plain text follows " * 10
    art = b"Subject: y\n\nsig | " + b"\x02 " * 20 + b"words " * 60
    form_feed = b"Subject: z\n\npage one\x0cpage two\n"
    for data in (overstrike, art, form_feed, "Café".encode("latin-1")):
        assert check_post("train/sci.med/1", data) == data.decode("latin-1")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00", r"train/sci.med/1 is binary \(it holds NUL"),
        (b"\x01\x1f" * 6 + b"a" * 88, r"train/sci.med/1 is binary \(12 of its 100 bytes"),
        (b"", "train/sci.med/1 is empty"),
        (b" \n\t\r\n  ", "train/sci.med/1 is whitespace-only"),
    ],
)
def test_check_post_refuses_binary_and_empty_posts(data: bytes, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        check_post("train/sci.med/1", data)


def test_check_groups_names_every_missing_group(raw: pd.DataFrame) -> None:
    check_groups(raw, ("train", "test"), "tiny")
    without = raw[~raw["label_name"].isin(["sci.med", "rec.autos"])]
    without = without[~((without["label_name"] == "sci.space") & (without["split"] == "test"))]
    with pytest.raises(PipelineError) as err:
        check_groups(without, ("train", "test"), "tiny")
    assert str(err.value) == (
        "tiny: groups without posts: train lacks 2 of 20: rec.autos, sci.med; "
        "test lacks 3 of 20: rec.autos, sci.med, sci.space"
    )
