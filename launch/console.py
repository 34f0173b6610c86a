"""Progress and messages on stderr, from one process only (MPI rank 0)."""
import sys


class Console:
    """quiet on every MPI rank but 0."""
    quiet = False


def log(message):
    if not Console.quiet:
        print(message, file=sys.stderr, flush=True)
