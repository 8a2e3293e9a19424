"""Old name of :mod:`gittornado.httpserver`, kept so existing imports work."""

from .httpserver import *  # noqa: F401,F403
from .httpserver import FramingLogFilter, HardenedHTTPServer  # noqa: F401
