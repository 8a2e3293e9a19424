"""gittornado: serve git repositories over HTTP from Tornado.

Public API for embedding::

    from gittornado import git_routes
    app = tornado.web.Application(my_routes + git_routes("/git", root="/srv/git"))
"""

__version__ = "0.1.0"

from .access import (  # noqa: E402
    AccessPolicy,
    AuthenticationFailed,
    FailureThrottle,
    IniPolicy,
    OpenPolicy,
    Permission,
    ReadOnlyPolicy,
)
from .handlers import (  # noqa: E402
    GitBackend,
    HealthHandler,
    InfoRefsHandler,
    MetricsHandler,
    PackListHandler,
    RepositoryFileHandler,
    ServiceHandler,
)
from .http1 import HardenedHTTPServer  # noqa: E402
from .observe import Metrics, RequestObserver  # noqa: E402
from .pipe import GitProcesses  # noqa: E402
from .repos import Repository, RepositoryRoot, resolve_repository  # noqa: E402
from .routes import git_routes, routes_for  # noqa: E402

__all__ = [
    "AccessPolicy",
    "AuthenticationFailed",
    "FailureThrottle",
    "IniPolicy",
    "GitBackend",
    "HealthHandler",
    "MetricsHandler",
    "GitProcesses",
    "HardenedHTTPServer",
    "InfoRefsHandler",
    "Metrics",
    "OpenPolicy",
    "PackListHandler",
    "Permission",
    "ReadOnlyPolicy",
    "Repository",
    "RepositoryFileHandler",
    "RepositoryRoot",
    "RequestObserver",
    "ServiceHandler",
    "git_routes",
    "resolve_repository",
    "routes_for",
    "__version__",
]
