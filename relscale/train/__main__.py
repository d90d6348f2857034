"""``python -m relscale.train CONFIG [key=value ...] [--resume]``: the entry torchrun launches
(``torchrun --nproc_per_node N -m relscale.train ...``). User errors exit with status 2."""

import argparse
import sys

from relscale.errors import RelscaleError
from relscale.train.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relscale.train", description="train one model from a config"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RelscaleError as err:
        print(f"relscale train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
