"""The base of the LFS handlers: JSON errors, bounded JSON bodies, access by signed URL or by policy.

Every LFS error is JSON (``message``, ``request_id``), as git-lfs shows the
message to its user.  A 401 carries ``LFS-Authenticate`` besides
``WWW-Authenticate``, as git-lfs expects, so git's credential helper is
asked for the password.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional, Tuple

from tornado.web import HTTPError, RequestHandler, stream_request_body

from ..access import AccessDenied, Grant
from ..backend import GitBackend
from ..handlers import GitRequestMixin
from ..permission import Permission
from ..repos import Repository
from ..util import Deadline, decimal, maybe_await
from . import LfsServer
from .signing import SignedRequest

#: The LFS API's media type, of requests and answers.
LFS_JSON = "application/vnd.git-lfs+json"
#: Largest JSON request body (a batch of 1000 objects takes about 100 KiB).
MAX_JSON_BODY = 1024 * 1024


class LfsError(HTTPError):
    """An LFS error whose ``message`` the client shows as it is."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, reason=_reason(status_code, message))
        self.message = message


def _reason(status_code: int, message: str) -> str:
    # The status line's reason: the message if it is short plain text, else the standard phrase.
    return message if len(message) < 100 and message.isprintable() else ""


class LfsHandler(GitRequestMixin, RequestHandler):
    """What every LFS handler shares."""

    lfs: LfsServer

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        assert backend.lfs is not None  # routes.py lists the LFS routes only then
        self.lfs = backend.lfs
        self.request_id = uuid.uuid4().hex
        self.service_label = "lfs"

    async def open_signed(
        self, name: str, oid: str, permission: Permission, method: str
    ) -> Tuple[Repository, Grant, Optional[SignedRequest]]:
        """Resolve ``name`` and check ``permission``: by the URL's valid signature, else by the policy.

        A signature stands for the user's credentials only: the policy still
        decides whether that user may (still) do this, so revoking a right
        takes effect at once.
        """
        repo = await maybe_await(self.backend.lookup, name)
        if repo is not None and "sig" in self.request.query_arguments:
            query = {
                key: self.get_query_argument(key)
                for key in ("size", "expires", "sig", "user")
                if key in self.request.query_arguments
            }
            signed = self.lfs.signer.verify(method, repo.name, oid, query)
            if signed is not None:
                self.repository, self.user = repo.name, signed.user
                if await maybe_await(self.backend.policy.authorize, signed.user, repo.name, permission):
                    return repo, Grant(signed.user), signed
                raise LfsError(403, "Access to this repository was withdrawn")
        repo, grant = await self.open_repository(name, permission)
        return repo, grant, None

    async def open_lfs_repository(self, name: str, permission: Permission) -> Tuple[Repository, Grant]:
        """:meth:`GitRequestMixin.open_repository`, with the LFS API's words for a refusal."""
        try:
            return await self.open_repository(name, permission)
        except AccessDenied as denied:
            if denied.status_code == 403 and permission is Permission.WRITE:
                denied.reason = f"You may read {self.repository} but not write to it"
            raise

    def send_json(self, body: Any, status: int = 200) -> None:
        """Answer ``body`` as LFS JSON, never cached."""
        self.set_status(status)
        self.set_no_cache()
        self.set_header("Content-Type", LFS_JSON)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The LFS API's error body: ``message`` and ``request_id``."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, AccessDenied) and error.challenge:
            self.set_header("WWW-Authenticate", error.challenge)
            self.set_header("LFS-Authenticate", error.challenge)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            self.set_header("Retry-After", str(retry_after))
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.SUPPORTED_METHODS))
        message = getattr(error, "message", None) or self._reason
        self.set_no_cache()
        self.set_header("Content-Type", LFS_JSON)
        self.finish(json.dumps({"message": message, "request_id": self.request_id}))


@stream_request_body
class JsonRequestHandler(LfsHandler):
    """An LFS handler whose request is a JSON document of at most :data:`MAX_JSON_BODY` bytes.

    A body that stops coming for the backend's ``body_timeout`` is answered 408 (Tornado's own body
    timeout, lifted here, would close the connection without a word).
    """

    def initialize(self, backend: GitBackend) -> None:  # type: ignore[override]
        super().initialize(backend)
        self.body_deadline = Deadline(backend.body_timeout, self._body_stalled)

    def prepare(self) -> None:
        self._body = bytearray()
        self._too_large = False
        length = decimal(self.request.headers.get("Content-Length", ""))
        if length is not None and length > MAX_JSON_BODY:
            raise LfsError(413, f"The request is larger than {MAX_JSON_BODY} bytes")
        media = self.request.headers.get("Content-Type", "").split(";")[0].strip()
        if self.request.method == "POST" and media not in (LFS_JSON, "application/json"):
            raise LfsError(415, f"Expected Content-Type {LFS_JSON}")
        if length or "Transfer-Encoding" in self.request.headers:
            self.request.connection.set_body_timeout(None)  # type: ignore[union-attr]
            self.body_deadline.restart()

    def _body_stalled(self) -> None:  # never after the answer: on_finish stops the deadline
        error = LfsError(408, "The request body did not come in time")
        self.send_error(408, exc_info=(type(error), error, None))

    def on_finish(self) -> None:
        self.body_deadline.stop()
        super().on_finish()

    def on_connection_close(self) -> None:
        self.body_deadline.stop()
        super().on_connection_close()

    def data_received(self, chunk: bytes) -> None:
        self.body_deadline.restart()
        self.bytes_in += len(chunk)
        if len(self._body) + len(chunk) > MAX_JSON_BODY:
            self._too_large = True
            self._body = bytearray()
        elif not self._too_large:
            self._body += chunk

    def json_body(self) -> dict:
        """The request's JSON object, or a 413/422 LFS error."""
        self.body_deadline.stop()  # it has all come
        if self._too_large:
            raise LfsError(413, f"The request is larger than {MAX_JSON_BODY} bytes")
        try:
            body = json.loads(self._body)
        except (ValueError, RecursionError):
            raise LfsError(422, "The request is not valid JSON") from None
        if not isinstance(body, dict):
            raise LfsError(422, "The request must be a JSON object")
        return body
