"""Each official format read from a hand-written fixture, and each kind of malformed input named by file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selfrefine.errors import UserError
from selfrefine.tasks import get_task

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_gsm8k() -> None:
    ex = get_task("gsm8k").load(FIX / "gsm8k")
    assert [e.gold for e in ex] == ["24", "1080", "-3"]  # thousands separator stripped, sign kept
    assert ex[0].id == "gsm8k-test-1" and ex[0].question.startswith("Tom has 3 boxes")
    assert ex[0].rationale == "Tom has 3*16 = 48 crayons.\nHe keeps 48/2 = 24 crayons."  # <<...>> stripped
    assert get_task("gsm8k").load(FIX / "gsm8k", split="train")[0].gold == "20"
    assert get_task("gsm8k").load(FIX / "gsm8k" / "train.jsonl")[0].gold == "20"  # a file path ignores split


def test_multiarith() -> None:
    ex = get_task("multiarith").load(FIX / "multiarith")
    assert [(e.id, e.gold) for e in ex] == [("multiarith-7", "7"), ("multiarith-8", "9")]
    assert ex[0].question == (  # the file's leading and trailing spaces stripped
        "Sara had 12 stickers. She gave 5 stickers to a friend. How many stickers does she have now?")
    assert ex[0].rationale is None


@pytest.mark.parametrize("name,n_options,golds", [("commonsenseqa", 5, ["C", "A"]), ("openbookqa", 4, ["B", "D"])])
def test_stem_choices(name: str, n_options: int, golds: list[str]) -> None:
    ex = get_task(name).load(FIX / name)
    assert [e.gold for e in ex] == golds
    assert all(len(e.choices) == n_options for e in ex)
    e = ex[0]
    assert e.choices["ABCDE".index(e.gold)] in ("rainy street", "sunlight")


def test_piqa() -> None:
    ex = get_task("piqa").load(FIX / "piqa")
    assert [e.gold for e in ex] == ["A", "A", "B"]
    assert ex[0].choices == ("Store it in a sealed bag.", "Leave it in the rain.")  # trailing space stripped
    assert ex[1].question == "dresser" and ex[2].id == "piqa-valid-3"


def test_socialiqa() -> None:
    ex = get_task("socialiqa").load(FIX / "socialiqa" / "dev.jsonl")
    assert [e.gold for e in ex] == ["A", "B", "C"]  # labels are 1-based
    assert ex[1].question == "Jordan helped a friend move house. What will the friend want to do next?"
    assert ex[2].choices == ("go to a party", "take the test", "get the books")


def test_explicit_labels_path(tmp_path: Path) -> None:
    from selfrefine.tasks.loaders import read_piqa

    labels = tmp_path / "mine.lst"
    labels.write_text("1\n1\n0\n")
    assert [e.gold for e in read_piqa(FIX / "piqa" / "valid.jsonl", labels)] == ["B", "B", "A"]


def test_limit_and_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(get_task("piqa").load(FIX / "piqa", limit=2)) == 2
    every = get_task("piqa").load(FIX / "piqa")
    assert get_task("piqa").load(FIX / "piqa", skip=1, limit=1) == every[1:2]  # a file split's tail
    monkeypatch.setenv("SELFREFINE_DATA", str(FIX))
    assert len(get_task("socialiqa").load()) == 3
    monkeypatch.delenv("SELFREFINE_DATA")
    with pytest.raises(UserError, match="pass a path"):
        get_task("gsm8k").load()


def _err(fn) -> UserError:
    with pytest.raises(UserError) as info:
        fn()
    return info.value


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_GSM = json.dumps({"question": "q", "answer": "a\n#### 3"})
GOOD_CSQA = json.dumps({"id": "x", "answerKey": "B", "question": {
    "stem": "s", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}]}})


@pytest.mark.parametrize("name,lines,line,message", [
    ("gsm8k", [GOOD_GSM, "{not json"], 2, "invalid JSON"),
    ("gsm8k", [GOOD_GSM, json.dumps({"question": "q"})], 2, "missing field 'answer'"),
    ("gsm8k", [json.dumps({"question": "q", "answer": "it is 3"})], 1, "####"),
    ("gsm8k", [json.dumps({"question": "q", "answer": "x\n#### three"})], 1, "not a number"),
    ("commonsenseqa", [GOOD_CSQA, GOOD_CSQA.replace('"answerKey": "B"', '"answerKey": "F"')], 2, "answerKey 'F'"),
    ("commonsenseqa", [GOOD_CSQA.replace('"answerKey": "B"', '"key": "B"')], 1, "missing field 'answerKey'"),
    ("openbookqa", [json.dumps({"question": {"stem": "s"}, "answerKey": "A"})], 1, "'choices'"),
])
def test_malformed_jsonl(tmp_path: Path, name: str, lines: list[str], line: int, message: str) -> None:
    path = _write(tmp_path / "test.jsonl", lines)
    e = _err(lambda: get_task(name).load(path))
    assert (e.file, e.line) == (str(path), line) and message in e.message


def test_malformed_multiarith(tmp_path: Path) -> None:
    rec = {"iIndex": 0, "sQuestion": "q", "lSolutions": [2.0]}
    path = tmp_path / "MultiArith.json"
    path.write_text(json.dumps([rec, {"iIndex": 1, "sQuestion": "q", "lSolutions": []}], indent=4))
    e = _err(lambda: get_task("multiarith").load(path))
    assert e.file == str(path) and e.line == 9 and "lSolutions" in e.message  # the second record opens on line 9
    path.write_text('[\n  {"sQuestion": "q",\n   "lSolutions": [1.0]\n  },\n  {"sQuestion": }\n]')
    assert _err(lambda: get_task("multiarith").load(path)).line == 5
    path.write_text(json.dumps(rec))
    assert "JSON array" in _err(lambda: get_task("multiarith").load(path)).message


@pytest.mark.parametrize("labels,line,message", [
    ("0\n1\n", 3, "2 labels for 3 questions"),
    ("0\n1\n0\n1\n", 4, "4 labels for 3 questions"),
    ("0\n2\n1\n", 2, "label '2'"),
])
def test_malformed_labels(tmp_path: Path, labels: str, line: int, message: str) -> None:
    shutil.copy(FIX / "piqa" / "valid.jsonl", tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst").write_text(labels)
    e = _err(lambda: get_task("piqa").load(tmp_path / "valid.jsonl"))
    assert (e.file, e.line) == (str(tmp_path / "valid-labels.lst"), line) and message in e.message


def test_missing_things(tmp_path: Path) -> None:
    shutil.copy(FIX / "socialiqa" / "dev.jsonl", tmp_path / "dev.jsonl")
    assert "labels file not found" in _err(lambda: get_task("socialiqa").load(tmp_path / "dev.jsonl")).message
    assert "file not found" in _err(lambda: get_task("gsm8k").load(tmp_path / "nope.jsonl")).message
    assert "has splits train, test" in _err(lambda: get_task("gsm8k").load(FIX / "gsm8k", split="dev")).message
    assert "not size" in _err(lambda: get_task("gsm8k").load(FIX / "gsm8k", size=5)).message
    assert "limit" in _err(lambda: get_task("gsm8k").load(FIX / "gsm8k", limit=0)).message


def test_cose_explanations_as_rationales(tmp_path: Path) -> None:
    """CommonsenseQA questions with their CoS-E explanations; a generic, one-word or missing explanation gives none."""
    from selfrefine.tasks import demonstration

    ex = get_task("cose").load(FIX, split="train")
    assert [(e.id, e.gold) for e in ex] == [("a1", "B"), ("a2", "A"), ("a3", "C"), ("a4", "D")]
    assert [e.rationale for e in ex] == ["A refrigerator keeps food like milk cold.", None, None, None]
    assert demonstration(ex[0], "choice") == "A refrigerator keeps food like milk cold.\nThe answer is (B)."
    dev = get_task("commonsenseqa").load(FIX / "commonsenseqa")
    assert [e.id for e in get_task("cose").load(FIX)] == [e.id for e in dev]  # "test" means dev
    shutil.copytree(FIX / "commonsenseqa", tmp_path / "commonsenseqa")
    assert "file not found" in _err(lambda: get_task("cose").load(tmp_path, split="train")).message
    (tmp_path / "cose").mkdir()
    (tmp_path / "cose" / "cose_dev_v1.11.jsonl").write_text('{"id": "x", "explanation": {"open-ended": "fine"}}\n'
                                                          '{"id": "y", "explanation": "plain"}\n')
    e = _err(lambda: get_task("cose").load(tmp_path))
    assert (e.file, e.line) == (str(tmp_path / "cose" / "cose_dev_v1.11.jsonl"), 2) and "open-ended" in e.message
    assert "needs the data folder" in _err(lambda: get_task("cose").load(FIX / "gsm8k" / "test.jsonl")).message
    assert "splits train, dev" in _err(lambda: get_task("cose").load(FIX, split="valid")).message
