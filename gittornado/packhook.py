"""The program git runs instead of ``git pack-objects`` when the pack cache is on.

git runs ``uploadpack.packObjectsHook`` as ``<hook> git pack-objects
<args...>`` with pack-objects' standard input; this answers it through
:func:`gittornado.packentry.serve`.  Every fetch pays for its start, so
gittornado runs it as ``python -I -S <path of this file>``: no site packages,
and not the ``gittornado`` package's ``__init__`` (which imports Tornado), only
its ``packentry`` and ``packfiles`` modules and a few standard ones.  That costs about 10 ms more
than pack-objects alone (``python -m benchmarks.storm`` measures it);
``python -m gittornado.packhook`` works too, at the price of importing the
package.  Without gittornado's settings in the environment it simply runs
pack-objects.
"""

import os
import sys

if __package__:  # python -m gittornado.packhook
    from . import packentry
else:  # python -I -S .../gittornado/packhook.py: the package's directory, without its __init__
    package = type(sys)("gittornado")
    package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["gittornado"] = package
    from gittornado import packentry


def read_input() -> bytes:
    """All of standard input: the wanted and excluded objects (small; git writes it before it reads)."""
    pieces = []
    while True:
        piece = os.read(0, packentry.CHUNK)
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)


def main() -> int:
    """Answer the pack-objects request git hands over in ``sys.argv``."""
    argv = sys.argv[1:]
    env = dict(os.environ)
    settings = packentry.HookSettings.from_environment(env)
    # git may put options before the command (a shallow fetch: ``git --shallow-file "" pack-objects``).
    if settings is None or "pack-objects" not in argv:
        os.execvp(argv[0], argv)
    return packentry.serve(argv, read_input(), env, settings)


if __name__ == "__main__":
    sys.exit(main())
