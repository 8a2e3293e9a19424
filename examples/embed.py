"""Mount gittornado inside an existing Tornado application.

    python examples/embed.py --port 8000 --gitbase /srv/git

serves the host application's page at http://localhost:8000/ and every
repository under /srv/git at http://localhost:8000/git/<name>, e.g.
``git clone http://localhost:8000/git/project.git``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os

import tornado.web

from gittornado import ReadOnlyPolicy, git_routes


class HomeHandler(tornado.web.RequestHandler):
    """The host application's own page: lists the repositories it serves."""

    def initialize(self, gitbase: str) -> None:
        self.gitbase = gitbase

    def get(self) -> None:
        names = sorted(n for n in os.listdir(self.gitbase) if not n.startswith("."))
        items = "".join(
            f"<li><code>git clone {html.escape(self.request.full_url())}git/{html.escape(n)}</code></li>"
            for n in names
        )
        self.write(f"<!doctype html><title>Repositories</title><h1>Repositories</h1><ul>{items}</ul>")


def make_app(gitbase: str) -> tornado.web.Application:
    """The host app's routes plus gittornado's, mounted under /git."""
    routes = [(r"/", HomeHandler, {"gitbase": gitbase})]
    routes += git_routes("/git", root=gitbase, policy=ReadOnlyPolicy())
    return tornado.web.Application(routes)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gitbase", default=".")
    args = parser.parse_args()
    app = make_app(os.path.realpath(args.gitbase))
    app.listen(args.port, address="127.0.0.1")
    print(
        f"embed example: host page at http://127.0.0.1:{args.port}/, git at http://127.0.0.1:{args.port}/git/",
        flush=True,
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
