import sys

from utils import distributed


class UserError(Exception):
    """Bad input from the user: reported as one line naming the problem and the fix, exit status 2."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2. Under
    torchrun the process group is left on the way out, whichever way main() ends."""
    try:
        main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
