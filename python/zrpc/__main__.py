"""``python -m zrpc SERVICE METHOD [PAYLOAD]``: the original zrpc's command line, on this client.

As the original's (``zrpc/__main__.py`` of zrpc 0.1): ``PAYLOAD`` is a Python
literal (``ast.literal_eval``: ``"{'a': [1, 2]}"``, ``42``, ``"'text'"``; none
sends ``None``), the call waits as long as it takes, the result is printed
with ``print()``, and an error is logged (``ERROR:root:...`` on standard
error; a handler's exception as its bare text, ``ValueError: ...``). ``-d``
turns on debug logs. Unlike the original, a failed call exits with status 1
(the original exited 0). The broker's socket directory is found as by
:class:`zrpc.client.Client` (``$ZRPC_SOCKET_DIR``, ...).

The Rust ``zrpc`` tool does more (``zrpc call SERVICE METHOD JSON``, ``zrpc
list``, timeouts, ``--json``, ...).
"""

import argparse
import ast
import logging
import sys

from . import errors
from .client import Client


def main(argv=None) -> int:
    """Runs the command line with ``argv`` (``sys.argv[1:]`` if ``None``); returns the exit status."""
    try:
        args = parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
        call(args.service, args.method, args.payload)
    except Exception as exc:
        # One line each: a new line in a service's message could forge an ``ERROR:root:`` one.
        if isinstance(exc, errors.RemoteError) and exc.remote_message is not None:
            logging.error(printable(exc.remote_message, keep=""))
        else:
            logging.error(printable(str(exc), keep=""))
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The original's arguments: ``[-d] SERVICE METHOD [PAYLOAD]``."""
    parser = argparse.ArgumentParser(prog='zrpc',
                                     description='CLI interface for ZRPC')

    parser.add_argument('-d', '--debug',
                        help='Turn on debug logs',
                        action='store_true')
    parser.add_argument('service',
                        help='Service name',
                        metavar='SERVICE')
    parser.add_argument('method',
                        help='Method to call',
                        metavar='METHOD')
    parser.add_argument('payload',
                        help='Payload to send [python object]',
                        metavar='PAYLOAD',
                        nargs='?',
                        type=ast.literal_eval,
                        default=None)

    return parser.parse_args(argv)


#: Bidirectional controls (format characters that reorder what a terminal shows).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with what must not reach a terminal as it is escaped (``\\x1b``): control
    characters (C0, DEL, C1) but those in ``keep``, and bidirectional controls. Results and
    error messages are another user's text: raw, they could set the terminal's title, clear
    it, or rewrite a line (``\\r``). Other characters (emoji joiners, no-break spaces...)
    are shown as they are."""
    def unsafe(c: str) -> bool:
        return (c < " " or "\x7f" <= c <= "\x9f" or c in _BIDI) and c not in keep
    if not any(unsafe(c) for c in text):
        return text
    return "".join(repr(c)[1:-1] if unsafe(c) else c for c in text)


def call(service, method, payload) -> None:
    """Calls ``service.method`` with ``payload`` (no timeout) and prints the result (a string
    :func:`printable`; other values print their ``repr``s, escaped already)."""
    with Client() as client:
        response = client.call(service, method, payload)
    print(printable(response) if isinstance(response, str) else response)


if __name__ == '__main__':
    sys.exit(main())
