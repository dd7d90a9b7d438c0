"""Flag types checked when the command line is parsed, so a bad value stops the script before anything is read
or written: finite numbers in range, the allowed values named. A bad flag is one line on stderr,
`error: --lr must be a finite number, got 'nan'`, and exit code 2 (see `Parser`)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, NoReturn


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`, exit code 2) like every other user mistake."""

    def error(self, message: str) -> NoReturn:
        # "argument --lr: must be ..." (a type below) reads "--lr must be ..."
        message = re.sub(r"^argument (\S+): (?=must be|expected)", r"\1 ", message)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _checked(kind: type, ok: Callable[[float], bool], what: str, name: str) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = name  # argparse names the type in some messages
    return parse


positive_float = _checked(float, lambda v: v > 0, "a finite number > 0", "positive_float")
nonneg_float = _checked(float, lambda v: v >= 0, "a finite number >= 0", "nonneg_float")
fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "fraction")
unit_interval = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "unit_interval")
positive_int = _checked(int, lambda v: v >= 1, ">= 1", "positive_int")  # not an integer: "expected an integer"
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0", "nonneg_int")

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def device_name(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def seed_list(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]: distinct integers, at least one."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"must be distinct seeds, got {text!r}")
    return values
