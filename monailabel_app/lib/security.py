"""Hardening of MONAI Label 0.8.5's HTTP server for this app, installed by ``MyApp`` at start-up.

What :func:`harden_server` does, and why it is here rather than in MONAI Label:

- **Upload limit** (``--conf max_upload_mb``, default 1024): :class:`UploadLimitMiddleware`
  answers 413 to a request whose ``Content-Length`` is over the limit without reading any of its
  body, and stops a streamed (chunked) body as soon as the bytes received pass the limit. MONAI
  Label's upload endpoints copy the whole body to a temporary file first (FastAPI spools every
  multipart file), so without it one request can fill the disk.
- **Ids in query parameters** (:class:`RequestGuardMiddleware`): ``image``, ``label``, ``id`` and
  ``tag`` on ``/datastore/*`` and ``/infer/*`` must be safe ids (``lib.datastore.brats.check_id``:
  1-128 letters, digits, ``._-``, no ``..``); anything else (``../x``, ``/abs/path``, NUL, very long
  names) is answered 400 before an endpoint or a datastore sees it, whatever the datastore. The
  datastores check ids again themselves.
- **Model weights** are not replaced or deleted through the API: ``PUT|DELETE /model/<name>``
  answer 403 (MONAI Label lets any annotator do it, and copies the upload over the served file in
  place). Weights come from training (``POST /train/brats``) or the bundle folder.
- **Sessions are off** (``/session/*`` answers 406): MONAI Label unpacks an uploaded session
  archive (``PUT /session/?uncompress=true``) with ``shutil.unpack_archive`` and no member check,
  so a tar with ``../`` members writes anywhere the server may write; and this app's inference
  takes datastore ids, not session images, so sessions serve no purpose here.
- **Inference parameters**: the JSON ``params`` of ``POST /infer/<model>`` may not set ``image``
  or ``label`` (MONAI Label merges them over the request, so a client could name any server file),
  and a ``label_tag`` must be a safe id (checked before the model runs);
  :func:`request_has_upload` tells ``MyApp.infer`` whether the request really carried a file.
- **Nothing a request sends stays behind** (:class:`RequestFilesMiddleware`): MONAI Label's
  endpoints copy uploads to temporary files and remove them in a background task that never runs
  when the request fails (a refused upload left its whole body in the temp folder), and
  ``GET /datastore/dataset`` leaves its zip; every temporary file those endpoints (and the
  datastores' archives) create is recorded for the request and removed once its response is sent.
- **Client errors are 4xx with their reason** (:class:`ErrorMiddleware`): an exception that reaches
  no handler is answered 422 when caused by bad data (a ``custom.data.BraTSDataError``, 415 for a
  file that is not NIfTI at all) or an invalid input (MONAI Label's ``INVALID_INPUT``), else 500
  with its type and message (a real server fault, logged with its traceback). A second training
  request while one runs is 409 (MONAI Label says 429).
- **Roles on every path**: ``POST /infer`` with ``save_label`` stores a label, so it needs the
  role that ``PUT /datastore/label`` needs (annotator); MONAI Label checks only the user role.
- **Authentication** (``MONAI_LABEL_AUTH_ENABLE=true``): MONAI Label 0.8.5 calls ``jwt.decode``
  without ``algorithms``, which PyJWT 2 refuses for every token, so with auth on every request got
  401. :func:`verify_token` replaces ``monailabel.endpoints.user.auth.from_token`` (looked up at
  call time by MONAI Label's ``get_current_user``): signature checked with the realm's public key
  (fetched from ``MONAI_LABEL_AUTH_REALM_URI`` as MONAI Label does) and only the asymmetric
  algorithms of ``--conf auth_algorithms`` (default ``RS256``, Keycloak's), ``exp`` required,
  malformed claims -> 401, identity provider unreachable -> 503.

Installing the middlewares: MONAI Label builds its FastAPI application (``monailabel.app.app``) at
import, with its own middleware list, and uvicorn serves that object; ``MyApp`` is created later,
inside the application's lifespan start-up (``app_instance()``), when Starlette has already built
the middleware stack (``app.add_middleware`` then refuses). :func:`install_middleware` appends ours
to ``app.user_middleware`` and rebuilds the stack (``build_middleware_stack``, what Starlette does
on first use), so they run for every request after start-up, inside MONAI Label's CORS middleware
(413/400 answers carry the CORS headers). It is idempotent (a ``/reload`` re-creates ``MyApp``).
The alternative, ``monailabel start_server --uvicorn_app <our module>:app``, would protect only
servers started with that extra flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import parse_qsl

from fastapi import HTTPException

from lib.params import truthy

logger = logging.getLogger(__name__)

MAX_UPLOAD_MB = 1024.0
ID_PARAMS = ("image", "label", "id", "tag")
ID_PATH_PREFIXES = ("/datastore", "/infer", "/wsi_infer")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

_UPLOAD = contextvars.ContextVar("monailabel_app_infer_upload", default=False)
_USER = contextvars.ContextVar("monailabel_app_user", default=None)
_REQUEST_FILES: contextvars.ContextVar[Optional[List[str]]] = contextvars.ContextVar("monailabel_app_request_files", default=None)
TEMPFILE_MODULES = ("monailabel.endpoints.datastore", "monailabel.endpoints.infer", "monailabel.datastore.local")


def parse_security_conf(conf: Dict[str, str]) -> dict:
    """``max_upload_mb`` (> 0) and ``auth_algorithms`` of the ``--conf`` options (ValueError if invalid)."""
    text = str(conf.get("max_upload_mb", MAX_UPLOAD_MB))
    try:
        mb = float(text)
    except ValueError as e:
        raise ValueError(f"--conf max_upload_mb must be a number of MiB, got {text!r}") from e
    if not mb > 0:
        raise ValueError(f"--conf max_upload_mb must be > 0, got {text!r}")
    algorithms = [a.strip() for a in str(conf.get("auth_algorithms", "RS256")).split(",") if a.strip()]
    bad = [a for a in algorithms if a not in ASYMMETRIC_ALGORITHMS]
    if not algorithms or bad:
        raise ValueError(f"--conf auth_algorithms: {bad or algorithms} not allowed; use asymmetric algorithms among {list(ASYMMETRIC_ALGORITHMS)}")
    return {"max_upload_bytes": int(mb * 1024 * 1024), "max_upload_mb": mb, "auth_algorithms": algorithms}


def harden_server(conf: Dict[str, str], app=None) -> dict:
    """Install everything listed in the module docstring; returns the parsed options."""
    from monailabel.config import settings

    options = parse_security_conf(conf)
    settings.MONAI_LABEL_SESSIONS = False  # read by MONAILabelApp.__init__ (-> self._sessions = None -> 406)
    if app is None:
        import monailabel.app

        app = monailabel.app.app
    install_middleware(app, options["max_upload_bytes"])
    track_endpoint_temp_files()
    guard_infer_endpoint()
    guard_train_endpoint()
    record_request_user()
    install_token_verification(options["auth_algorithms"])
    logger.info(
        f"Server hardening: uploads <= {options['max_upload_mb']:g} MiB, ids checked on {list(ID_PATH_PREFIXES)}, "
        f"sessions off, model upload/delete refused, auth {'ON (' + ','.join(options['auth_algorithms']) + ')' if settings.MONAI_LABEL_AUTH_ENABLE else 'off'}"
    )
    return options


# ------------------------------------------------------------------------------------------ ASGI


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class UploadLimitMiddleware:
    """Refuse (413) request bodies larger than ``max_bytes``: by ``Content-Length`` before reading
    any of it, and for bodies without one (chunked) once the bytes received pass the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _detail(self) -> str:
        return f"request body larger than the server's upload limit of {self.max_bytes / 2**20:g} MiB (--conf max_upload_mb)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        if lengths:
            try:
                length = int(lengths[0])
            except ValueError:
                return await _send_json(send, 400, f"invalid Content-Length {lengths[0][:40]!r}")
            if length > self.max_bytes:
                logger.warning(f"413 {scope['method']} {scope['path']}: Content-Length {length} > {self.max_bytes}")
                return await _send_json(send, 413, self._detail())

        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded and not started:
                return  # what the app answers after the limit (e.g. FastAPI's 400 "error parsing the body") is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            logger.warning(f"413 {scope['method']} {scope['path']}: streamed body passed {self.max_bytes} bytes")
            await _send_json(send, 413, self._detail())


def request_refusal(method: str, path: str, query_string: bytes) -> Optional[tuple[int, str]]:
    """``(status, detail)`` if the request is refused before reaching MONAI Label, else None."""
    from lib.datastore.brats import check_id

    if path.startswith("/model/") and method in ("PUT", "DELETE"):
        return 403, "model weights are not replaced or deleted through the API: train (POST /train/<model>) or change the bundle folder on the server"
    if path.startswith(ID_PATH_PREFIXES):
        for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if key in ID_PARAMS and value != "":
                try:
                    check_id(value, "label tag" if key == "tag" else f"{key} id")
                except HTTPException as e:
                    return e.status_code, str(e.detail)
    return None


class RequestGuardMiddleware:
    """Answer :func:`request_refusal`'s refusals before any endpoint (or body read) runs."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root):]
            refusal = request_refusal(scope["method"], path, scope.get("query_string", b""))
            if refusal is not None:
                logger.warning(f"{refusal[0]} {scope['method']} {scope['path']}: {refusal[1][:200]}")
                return await _send_json(send, *refusal)
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------ request files and errors


def track_request_file(path: str) -> str:
    """Record ``path`` as a temporary file of the current request (removed after its response); returns it."""
    files = _REQUEST_FILES.get()
    if files is not None:
        files.append(path)
    return path


class _TrackedTempfile:
    """Stands in for the ``tempfile`` module inside :data:`TEMPFILE_MODULES`: named temporary files are tracked."""

    def __getattr__(self, name: str):
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args, **kwargs):  # noqa: N802 (the tempfile name)
        f = tempfile.NamedTemporaryFile(*args, **kwargs)
        track_request_file(f.name)
        return f


def track_endpoint_temp_files() -> None:
    import importlib

    for name in TEMPFILE_MODULES:
        importlib.import_module(name).tempfile = _TrackedTempfile()


class RequestFilesMiddleware:
    """Remove every file recorded by :func:`track_request_file` once the request's response is sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        files: List[str] = []
        token = _REQUEST_FILES.set(files)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST_FILES.reset(token)
            for path in files:
                with contextlib.suppress(OSError):
                    os.remove(path)


def error_response(exc: BaseException) -> tuple[int, str]:
    """``(status, detail)`` for an exception no endpoint handled (see module docstring)."""
    from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

    from custom.data import NotNiftiError, clear_error

    found = clear_error(exc)
    if found is not None and found[0] == "BraTSDataError":
        chain, e = [], exc
        while e is not None and e not in chain:
            chain.append(e)
            e = e.__cause__ or e.__context__
        return (415 if any(isinstance(c, NotNiftiError) for c in chain) else 422), found[1]
    e = exc
    while e is not None:
        if isinstance(e, MONAILabelException) and e.error == MONAILabelError.INVALID_INPUT:
            return 422, str(e.msg)
        e = e.__cause__
    message = getattr(exc, "msg", None) or str(exc) or "no message"
    return 500, f"server error ({type(exc).__name__}): {message}"


class ErrorMiddleware:
    """Answer an exception that escaped the endpoints with :func:`error_response` (JSON ``detail``)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:
            if started:
                raise
            status, detail = error_response(e)
            if status >= 500:
                logger.exception(f"{status} {scope['method']} {scope['path']}: {detail[:300]}")
            else:
                logger.warning(f"{status} {scope['method']} {scope['path']}: {detail[:300]}")
            await _send_json(send, status, detail)


def install_middleware(app, max_bytes: int) -> None:
    """Append the request-file sweep, the error answers, the guard and the upload limit to ``app``'s
    middleware (outermost first) and (re)build its stack (see module docstring)."""
    from starlette.middleware import Middleware

    ours = (RequestFilesMiddleware, ErrorMiddleware, RequestGuardMiddleware, UploadLimitMiddleware)
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls not in ours]
    app.user_middleware += [Middleware(RequestFilesMiddleware), Middleware(ErrorMiddleware), Middleware(RequestGuardMiddleware),
                            Middleware(UploadLimitMiddleware, max_bytes=max_bytes)]
    if app.middleware_stack is not None:  # already serving (we are inside its lifespan start-up)
        app.middleware_stack = app.build_middleware_stack()


# -------------------------------------------------------------------------------------- inference


def request_has_upload() -> bool:
    """True while ``POST /infer/<model>`` runs for a request that uploaded the image file itself."""
    return _UPLOAD.get()


def guard_infer_endpoint() -> None:
    """Wrap MONAI Label's ``run_inference`` (called by ``POST /infer/<model>``; looked up at call time)."""
    from monailabel.endpoints import infer as endpoint

    if getattr(endpoint.run_inference, "_monailabel_app_guarded", False):
        return
    original = endpoint.run_inference

    @functools.wraps(original)
    def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
        try:
            p = json.loads(params) if params else {}
        except (TypeError, json.JSONDecodeError) as e:
            raise HTTPException(status_code=400, detail=f"params must be a JSON object: {e}") from e
        if not isinstance(p, dict):
            raise HTTPException(status_code=400, detail="params must be a JSON object")
        for key in ("image", "label"):
            if key in p:
                raise HTTPException(status_code=400, detail=f"params may not set {key!r}: pass the image id as the `image` query parameter or upload the file")
        if "label_tag" in p:  # where save_label=true stores the result: checked before the model runs
            from lib.datastore.brats import check_id

            check_id(p["label_tag"], "label tag")
        if truthy(p.get("save_label", False), "save_label"):
            require_role_to_save_labels()
        if session_id:
            raise HTTPException(status_code=406, detail="sessions are not enabled on this server: pass the image id or upload the file")
        token = _UPLOAD.set(file is not None)
        try:
            return original(background_tasks, model, image, session_id, params, file, label, output)
        finally:
            _UPLOAD.reset(token)

    run_inference._monailabel_app_guarded = True
    endpoint.run_inference = run_inference


def guard_train_endpoint() -> None:
    """``POST /train/<model>`` while a training runs: 409 with the reason (MONAI Label answers 429)."""
    from monailabel.endpoints import train as endpoint

    if getattr(endpoint.run_model, "_monailabel_app_guarded", False):
        return
    original = endpoint.run_model

    from monailabel.utils.async_tasks.utils import tasks

    busy = ("a training task is already running: wait for it (GET /train/), stop it (DELETE /train/), "
            "or queue this one with enqueue=true")

    @functools.wraps(original)
    def run_model(model, params=None, run_sync=False, enqueue=False):
        # MONAI Label sees a task as running only once its process has started; a submitted one counts too
        if not enqueue and any(t.get("status") in ("SUBMITTED", "RUNNING") for t in tasks("train")):
            raise HTTPException(status_code=409, detail=busy)
        try:
            return original(model, params, run_sync, enqueue)
        except HTTPException as e:
            if e.status_code != 429:
                raise
            raise HTTPException(status_code=409, detail=busy) from e

    run_model._monailabel_app_guarded = True
    endpoint.run_model = run_model


# --------------------------------------------------------------------------------- authentication


def record_request_user() -> None:
    """Keep the user that MONAI Label's role check (``RBAC``) let through, for checks deeper in the request."""
    from monailabel.endpoints.user import auth

    if getattr(auth.RBAC.__call__, "_monailabel_app_recorded", False):
        return
    original = auth.RBAC.__call__

    async def call(self, user=auth.Security(auth.get_current_user)):
        user = await original(self, user)
        _USER.set(user)
        return user

    call._monailabel_app_recorded = True
    auth.RBAC.__call__ = call


def require_role_to_save_labels() -> None:
    """403 unless the request's user may save labels (the annotator role of ``PUT /datastore/label``)."""
    from monailabel.config import settings

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    user = _USER.get()
    role = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
    if user is None or role not in (user.roles or []):
        raise HTTPException(status_code=403, detail=f"save_label stores a label: it needs the {role!r} role, like PUT /datastore/label")


def verify_token(token: str, algorithms: Sequence[str] = ("RS256",)):
    """MONAI Label's ``from_token`` with the algorithms pinned (see module docstring)."""
    import jwt
    import requests
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    try:
        key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    except (requests.RequestException, ValueError, KeyError) as e:
        logger.error(f"cannot fetch the realm's public key from {settings.MONAI_LABEL_AUTH_REALM_URI}: {e}")
        raise HTTPException(status_code=503, detail="identity provider unreachable: cannot verify tokens") from e
    options = {"verify_signature": True, "verify_aud": False, "verify_exp": True, "require": ["exp"]}
    payload = jwt.decode(token, key, algorithms=list(algorithms), options=options)  # InvalidTokenError -> 401 in MONAI Label

    claims: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        claims = claims.get(part) if isinstance(claims, dict) else None
    roles = [r for r in claims if isinstance(r, str)] if isinstance(claims, list) else []
    username = payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME)
    if not isinstance(username, str) or not username:
        raise jwt.InvalidTokenError(f"token has no {settings.MONAI_LABEL_AUTH_TOKEN_USERNAME!r} claim")
    email, name = payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL), payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME)
    return auth.User(username=username, email=email if isinstance(email, str) else None, name=name if isinstance(name, str) else None, roles=roles)


def install_token_verification(algorithms: Sequence[str]) -> None:
    from monailabel.endpoints.user import auth

    auth.from_token = functools.partial(verify_token, algorithms=tuple(algorithms))
