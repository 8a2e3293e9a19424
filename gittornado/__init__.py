"""gittornado: serve git repositories over HTTP from Tornado.

Public API for embedding::

    from gittornado import git_routes
    app = tornado.web.Application(my_routes + git_routes("/git", root="/srv/git"))
"""

__version__ = "0.1.0"

from .access import AccessPolicy, AuthenticationFailed, OpenPolicy, ReadOnlyPolicy  # noqa: E402
from .backend import GitBackend  # noqa: E402
from .dumb import PackListHandler, RepositoryFileHandler  # noqa: E402
from .httpserver import HardenedHTTPServer  # noqa: E402
from .inipolicy import IniPolicy  # noqa: E402
from .observe import Metrics, RequestObserver  # noqa: E402
from .permission import Permission  # noqa: E402
from .process import GitProcesses  # noqa: E402
from .repos import Repository, RepositoryRoot, resolve_repository  # noqa: E402
from .routes import git_routes, routes_for  # noqa: E402
from .smart import InfoRefsHandler, ServiceHandler  # noqa: E402
from .status import HealthHandler, MetricsHandler  # noqa: E402
from .throttle import FailureThrottle  # noqa: E402

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
