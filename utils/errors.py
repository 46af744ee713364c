import sys

from utils import distributed


class UserError(Exception):
    """Bad input from the user: reported as one line naming the problem and the fix, exit status 2."""


def need(ok, message):
    """Raise UserError(message) unless `ok`: the form of every config check."""
    if not ok:
        raise UserError(message)


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2. Under
    torchrun the process group is left on the way out, whichever way main() ends."""
    try:
        main()
    except UserError as e:
        message = str(e).strip()
        if '\n' in message:  # raised in a DataLoader worker, which wraps it in the worker's traceback
            message = message.splitlines()[-1].split('UserError: ', 1)[-1]
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
