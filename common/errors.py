"""The one kind of error a user sees: a line naming the problem and its fix (exit status 2)."""
import re


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
