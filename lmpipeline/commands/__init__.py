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


def _checked(kind, ok, rule: str):
    """An argparse type: a number of `kind` for which ok(value) holds, else `rule` in the message."""
    def parse(text: str):
        value = _number(text, kind)
        if not ok(value):
            raise _invalid(f"{rule}, got {value:g}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "must be 1 or more")
temperature = _checked(float, lambda v: v >= 0, "must be 0 (greedy) or more")
probability = _checked(float, lambda v: 0 < v <= 1, "must be in (0, 1]")  # a nucleus threshold
non_negative_int = _checked(int, lambda v: v >= 0, "must be 0 or more")
