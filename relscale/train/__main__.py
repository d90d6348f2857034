"""``python -m relscale.train CONFIG [key=value ...] [--resume] [--threads N]``: the entry torchrun
launches (``torchrun --nproc_per_node N -m relscale.train ...``). It is ``relscale train``: the same
arguments and the same error handling (bad input: one line, exit status 2; ``--debug`` for the
traceback), see relscale.cli."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``relscale train ARGV``; returns the exit status."""
    from relscale.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
