"""gittornado: serve git repositories over HTTP from Tornado.

Public API for embedding::

    from gittornado import git_routes
    app = tornado.web.Application(my_routes + git_routes("/git", root="/srv/git"))
"""

__version__ = "0.1.0"

from .access import (  # noqa: E402
    AccessPolicy,
    AuthenticationFailed,
    OpenPolicy,
    Permission,
    ReadOnlyPolicy,
)
from .handlers import (  # noqa: E402
    GitBackend,
    InfoRefsHandler,
    PackListHandler,
    RepositoryFileHandler,
    ServiceHandler,
)
from .repos import Repository, RepositoryRoot, resolve_repository  # noqa: E402
from .routes import git_routes, routes_for  # noqa: E402

__all__ = [
    "AccessPolicy",
    "AuthenticationFailed",
    "GitBackend",
    "InfoRefsHandler",
    "OpenPolicy",
    "PackListHandler",
    "Permission",
    "ReadOnlyPolicy",
    "Repository",
    "RepositoryFileHandler",
    "RepositoryRoot",
    "ServiceHandler",
    "git_routes",
    "resolve_repository",
    "routes_for",
    "__version__",
]
