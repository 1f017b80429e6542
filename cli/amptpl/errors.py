"""The one exception the library raises for bad input."""


class AmptplError(Exception):
    """Bad input (a name, a path, an option): the message is one line naming the thing and what is allowed.

    The CLI prints it as ``Error: <message>`` on stderr and exits with status 2; nothing has been written.
    """
