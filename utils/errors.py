import re
import sys

from utils import distributed


class UserError(Exception):
    """Bad input from the user: reported as one line naming the problem and the fix, exit status 2."""


def need(ok, message):
    """Raise UserError(message) unless `ok`: the form of every config check."""
    if not ok:
        raise UserError(message)


def nondeterministic_op(error):
    """The op a RuntimeError from `torch.use_deterministic_algorithms(True)` names (it has no deterministic
    kernel on this device), else None. torch.compile's errors carry the message inside theirs."""
    found = re.search(r'(\S+) does not have a deterministic implementation', str(error))
    return found.group(1) if found else None


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit status 2, as does an op
    that `deterministic True` forbids. Under torchrun the process group is left on the way out, whichever
    way main() ends."""
    try:
        try:
            main()
        except RuntimeError as e:
            op = nondeterministic_op(e)
            if op is None:
                raise
            raise UserError(f'deterministic True, but {op} has no deterministic implementation on this device; '
                            f'set deterministic False to run with it') from e
    except UserError as e:
        message = str(e).strip()
        if '\n' in message:  # raised in a DataLoader worker, which wraps it in the worker's traceback
            message = message.splitlines()[-1].split('UserError: ', 1)[-1]
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
