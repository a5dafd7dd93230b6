"""The command-line commands, one module each (lmpipeline/cli.py wires them)."""


def add_allow_pickle_weights(parser) -> None:
    """--allow-pickle-weights, for each command that loads base weights (models/loading.pickle_policy)."""
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="load base weights from pickle files (.bin) when there are no .safetensors; "
                             "unpickling can run code")
