"""GallopError: bad input the user can fix; the `gallop` command reports it as a single line (exit status 2)."""


class GallopError(Exception):
    """Bad input or an environment problem the user can fix (a missing file, a model that does not load).

    The command prints ``gallop: error: <message>`` for this type only; any other exception is a bug
    and keeps its traceback.
    """
