"""cab_vllm.argtypes: the checked argparse types every command line of the project shares."""

from __future__ import annotations

import argparse
import math

import pytest

from cab_vllm import argtypes


@pytest.mark.parametrize("parse, good, bad", [
    (argtypes.sparsity, [("0", 0.0), ("0.999", 0.999)], ["1", "1.0", "-0.1", "nan", "inf", "x", ""]),
    (argtypes.fraction, [("0", 0.0), ("1", 1.0)], ["1.01", "-1e-9", "nan"]),
    (argtypes.positive_int, [("1", 1), ("131072", 131072)], ["0", "-3", "1.5", "x"]),
    (argtypes.nonneg_int, [("0", 0)], ["-1", "0.0"]),
    (argtypes.positive_float, [("0.5", 0.5), ("600", 600.0)], ["0", "-1", "inf", "nan"]),
    (argtypes.seconds, [("75", 75)], ["0", "2.5"]),
])
def test_checked_types_accept_and_reject(parse, good, bad):
    for s, want in good:
        got = parse(s)
        assert got == want and type(got) is type(want)
    for s in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=r"^expected .*, got " + repr(s).replace("'", "'")):
            parse(s)


def test_errors_name_the_flag_through_argparse(capsys):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=argtypes.sparsity)
    ap.add_argument("--body", type=argtypes.json_object('{"a": 1}'))
    assert ap.parse_args(["--sparsity", "0.9", "--body", '{"x": [1]}']).body == {"x": [1]}
    for argv, msg in [(["--sparsity", "1.5"], "argument --sparsity: expected a number in [0, 1), got '1.5'"),
                      (["--body", "[1]"], "argument --body: expected a JSON object such as '{\"a\": 1}'"),
                      (["--body", "{"], "argument --body: not valid JSON")]:
        with pytest.raises(SystemExit):
            ap.parse_args(argv)
        assert msg in capsys.readouterr().err
    assert math.isinf(argtypes.checked(float, lambda x: x > 0, "a rate")("inf"))
