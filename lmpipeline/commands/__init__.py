"""The command-line commands, one module each (lmpipeline/cli.py wires them)."""


def add_allow_pickle_weights(parser) -> None:
    """--allow-pickle-weights, for each command that loads base weights (models/loading.pickle_policy)."""
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="load base weights from pickle files (.bin) when there are no .safetensors; "
                             "unpickling can run code")


# Flag value types: argparse reports a bad value as `argument --flag: ...` with exit code 2, before
# anything loads. One set of checks for every command, so no command takes a value it cannot use.
def _number(text: str, kind):
    import math

    try:
        value = kind(text)
    except ValueError:
        raise _invalid(f"expected a {'whole number' if kind is int else 'number'}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(f"must be a finite number, got {text!r}")
    return value


def _invalid(message: str):
    import argparse

    return argparse.ArgumentTypeError(message)


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise _invalid(f"must be 1 or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise _invalid(f"must be 0 or more, got {value}")
    return value


def temperature(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise _invalid(f"must be 0 (greedy) or more, got {value:g}")
    return value


def probability(text: str) -> float:
    """A nucleus threshold: in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise _invalid(f"must be in (0, 1], got {value:g}")
    return value
