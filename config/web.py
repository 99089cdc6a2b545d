"""The web server: uWSGI (the pyuwsgi wheel) serving `config.wsgi` with the options in
platform/uwsgi.ini. Extra arguments are uWSGI options and override the file's:

    python -m config.web --http11-socket 127.0.0.1:8000 --processes 2 --threads 4

uWSGI parses HTTP in C, so it costs the platform about 20 us of CPU per request on this machine kind;
gunicorn cost about 150 us (both measured on a trivial WSGI app; README, "Benchmarks").
"""

from __future__ import annotations

import sys

from config.stack import REPO

INI = REPO / "platform" / "uwsgi.ini"


def main(argv: list[str]) -> None:
    import pyuwsgi

    sys.argv = ["uwsgi", "--ini", str(INI), "--pythonpath", str(REPO), *argv]
    pyuwsgi.run()  # never returns: the master serves until SIGTERM or SIGINT


if __name__ == "__main__":
    main(sys.argv[1:])
