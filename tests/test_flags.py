"""Flag types: each accepts the values in its range (as the right type) and refuses the rest naming the value;
`Parser` reports a bad flag as one line, `error: --flag must be ...`, with exit code 2."""

from __future__ import annotations

import argparse

import pytest

from selfrefine import flags

TYPES = [  # (parse, kind, accepted, refused)
    (flags.positive_float, float, ["1e-4", "3"], ["0", "-1", "nan", "inf", "x"]),
    (flags.nonneg_float, float, ["0", "0.5"], ["-0.1", "nan", "-inf"]),
    (flags.fraction, float, ["0", "0.99"], ["1", "-0.1"]),
    (flags.unit_interval, float, ["1", "0.01"], ["0", "1.5"]),
    (flags.positive_int, int, ["1", "64"], ["0", "-3", "1.5", "two"]),
    (flags.nonneg_int, int, ["0", "5"], ["-1", "0.0"]),
    (flags.device_name, str, ["auto", "cpu", "cuda", "cuda:1", "mps"], ["gpu", "cuda:", "cuda:x", "CPU"]),
]


@pytest.mark.parametrize("parse,kind,accepted,refused", TYPES, ids=[t[0].__name__ for t in TYPES])
def test_accepts_its_range_and_refuses_the_rest(parse, kind: type, accepted: list[str], refused: list[str]) -> None:
    for text in accepted:
        value = parse(text)
        assert type(value) is kind and value == kind(text), text
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


def test_parser_error_is_one_line_naming_the_flag(capsys: pytest.CaptureFixture) -> None:
    parser = flags.Parser(prog="train_sft.py")
    parser.add_argument("--lr", type=flags.positive_float, default=1e-4)
    parser.add_argument("--batch-size", type=flags.positive_int, default=8)
    assert parser.parse_args(["--lr", "2e-5", "--batch-size", "4"]) == argparse.Namespace(lr=2e-5, batch_size=4)
    for argv, says in [(["--lr", "-1"], "--lr must be a finite number > 0, got '-1'"),
                       (["--batch-size", "1.5"], "--batch-size expected an integer, got '1.5'"),
                       (["--epochs", "2"], "unrecognized arguments: --epochs 2")]:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {says} (see train_sft.py --help)\n"
