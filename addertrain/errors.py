"""The one exception type that ends a command with a clear message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (recipe, dataset, checkpoint, command line).

    The CLI prints ``str(err)`` without a traceback and exits with code 2, so the
    message must name the thing that is wrong and how to fix it.
    """

    exit_code = 2
