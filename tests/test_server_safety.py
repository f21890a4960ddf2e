"""Security and crash safety of the MONAI Label app (monailabel_app/) under a real server on loopback.

One server on a flat folder of three 4D MSD images with ``--conf max_upload_mb 1``: odd ids on every
endpoint where an id enters, the upload limit (Content-Length and streamed bodies), the refused
features (sessions, model upload), then SIGKILL while label saves are in flight and a restart on the
same studies folder. A second server with MONAI Label's authentication on, against a small identity
provider on loopback that serves its realm's RSA public key the way Keycloak does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import select
import shutil
import socket
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from custom.atomic_files import TEMP_PREFIX
from custom.synthetic import write_dataset
from devtools import mlapp_server as ms

BAD_IDS = ["../BRATS_001", "..", "/etc/passwd", "BRATS_001/../BRATS_002", "labels/../BRATS_001", "..\\BRATS_001",
           "BRATS_001\x00.nii.gz", "a" * 300, ".hidden", "BRATS_001 ", "%2e%2e%2fBRATS_001", "BRATS_001\n", "BRATS\t001", "BRATS_001\r\n"]
IMAGES = ["BRATS_001", "BRATS_002", "BRATS_003"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _nifti_bytes(img, suffix=".nii.gz") -> bytes:
    buf = io.BytesIO()
    holder = nib.FileHolder(fileobj=buf)
    img.to_file_map({"header": holder, "image": holder})
    raw = buf.getvalue()
    if suffix == ".nii.gz":
        import gzip

        return gzip.compress(raw, mtime=0)
    return raw


def _label(studies: Path, image_id: str, seed: int, suffix=".nii.gz") -> bytes:
    """A valid MSD label (values 0..3) in the image's grid, different for each seed."""
    img = nib.load(studies / f"{image_id}.nii.gz")
    lab = np.zeros(img.shape[:3], np.uint8)
    rng = np.random.default_rng(seed)
    x, y, z = (int(rng.integers(5, s - 15)) for s in img.shape[:3])
    lab[x:x + 10, y:y + 10, z:z + 8] = 1 + seed % 3
    return _nifti_bytes(nib.Nifti1Image(lab, img.affine), suffix)


def _small_image() -> bytes:
    """A valid 4D image (20x20x12 voxels of 1 mm, four channels of noise): uploads well under the 1 MiB limit."""
    data = np.random.default_rng(0).random((20, 20, 12, 4)).astype(np.float32) + 0.5
    return _nifti_bytes(nib.Nifti1Image(data, np.eye(4)))


def _put_label(url, image_id, data: bytes, tag="final", name="label.nii.gz", headers=None, timeout=60):
    return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": tag}, files={"label": (name, data)},
                        headers=headers, timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlapp_safety")
    write_dataset(tmp / "msd", 3, seed=0, layout="msd", size="small")
    studies = tmp / "studies"
    studies.mkdir()
    for f in sorted((tmp / "msd" / "imagesTr").glob("*.nii.gz")):
        shutil.copy(f, studies / f.name)
    bundle = ms.bundle_copy(tmp / "bundle", with_weights=True)
    server_tmp = tmp / "server_tmp"  # the server's temporary folder (TMPDIR), checked for leftovers
    server_tmp.mkdir()
    proc, info = ms.launch(tmp, studies, bundle, conf={"max_upload_mb": "1"}, env={"TMPDIR": str(server_tmp)})
    state = {"proc": proc, "server_tmp": server_tmp, **info}
    try:
        yield state
    finally:
        ms.stop(state["proc"])


# ------------------------------------------------------------------------------------ odd ids


def _endpoint_calls(url: str, bad: str, label: bytes):
    """(name, callable) for every endpoint where an image/label id or tag enters."""
    good = "BRATS_001"
    return [
        ("GET /datastore/image", lambda: requests.get(f"{url}/datastore/image", params={"image": bad})),
        ("HEAD /datastore/image", lambda: requests.head(f"{url}/datastore/image", params={"image": bad})),
        ("PUT /datastore/image", lambda: requests.put(f"{url}/datastore/image", params={"image": bad}, files={"file": ("x.nii.gz", label)})),
        ("DELETE /datastore/image", lambda: requests.delete(f"{url}/datastore/image", params={"id": bad})),
        ("GET /datastore/image/info", lambda: requests.get(f"{url}/datastore/image/info", params={"image": bad})),
        ("PUT /datastore/image/info", lambda: requests.put(f"{url}/datastore/image/info", params={"image": bad}, data={"info": "{}"})),
        ("GET /datastore/label", lambda: requests.get(f"{url}/datastore/label", params={"label": bad, "tag": "final"})),
        ("GET /datastore/label tag", lambda: requests.get(f"{url}/datastore/label", params={"label": good, "tag": bad})),
        ("HEAD /datastore/label", lambda: requests.head(f"{url}/datastore/label", params={"image": bad, "tag": "final"})),
        ("HEAD /datastore/label tag", lambda: requests.head(f"{url}/datastore/label", params={"image": good, "tag": bad})),
        ("PUT /datastore/label", lambda: _put_label(url, bad, label)),
        ("PUT /datastore/label tag", lambda: _put_label(url, good, label, tag=bad)),
        ("DELETE /datastore/label", lambda: requests.delete(f"{url}/datastore/label", params={"id": bad, "tag": "final"})),
        ("DELETE /datastore/label tag", lambda: requests.delete(f"{url}/datastore/label", params={"id": good, "tag": bad})),
        ("GET /datastore/label/info", lambda: requests.get(f"{url}/datastore/label/info", params={"label": bad, "tag": "final"})),
        ("GET /datastore/label/info tag", lambda: requests.get(f"{url}/datastore/label/info", params={"label": good, "tag": bad})),
        ("PUT /datastore/label/info", lambda: requests.put(f"{url}/datastore/label/info", params={"label": bad, "tag": "final"}, data={"info": "{}"})),
        ("PUT /datastore/label/info tag", lambda: requests.put(f"{url}/datastore/label/info", params={"label": good, "tag": bad}, data={"info": "{}"})),
        ("PUT /datastore/updatelabelinfo", lambda: requests.put(f"{url}/datastore/updatelabelinfo", params={"label": bad, "tag": "final"}, data={"params": "{}"})),
        ("POST /infer image", lambda: requests.post(f"{url}/infer/{ms.MODEL}", params={"image": bad})),
        ("POST /infer params.image", lambda: requests.post(f"{url}/infer/{ms.MODEL}", params={"image": good}, data={"params": json.dumps({"image": bad})})),
        ("POST /infer label_tag", lambda: requests.post(f"{url}/infer/{ms.MODEL}", params={"image": good},
                                                         data={"params": json.dumps({"save_label": True, "label_tag": bad, "crf": False})})),
    ]


def test_odd_ids_refused_on_every_endpoint(server):
    url, studies = server["url"], server["studies"]
    label = _label(studies, "BRATS_001", 0)
    before = sorted(p.relative_to(server["tmp"]) for p in server["tmp"].rglob("*") if "logs" not in p.parts)
    wrong = []
    for bad in BAD_IDS:
        for name, call in _endpoint_calls(url, bad, label):
            r = call()
            if r.status_code != 400:
                wrong.append((name, bad[:20], r.status_code, r.text[:120]))
    assert wrong == [], wrong
    # well-formed ids that do not exist: 404, never 200 with an empty answer or 500
    for name, call in [
        ("image/info", lambda: requests.get(f"{url}/datastore/image/info", params={"image": "NO_SUCH"})),
        ("label/info", lambda: requests.get(f"{url}/datastore/label/info", params={"label": "BRATS_001", "tag": "no_such_tag"})),
        ("PUT label/info", lambda: requests.put(f"{url}/datastore/label/info", params={"label": "NO_SUCH", "tag": "final"}, data={"info": "{}"})),
        ("GET label", lambda: requests.get(f"{url}/datastore/label", params={"label": "NO_SUCH", "tag": "final"})),
        ("infer", lambda: requests.post(f"{url}/infer/{ms.MODEL}", params={"image": "NO_SUCH"})),
    ]:
        assert call().status_code == 404, name
    # an upload's file name never becomes a path: MONAI Label keeps its base name, the datastore checks it
    r = requests.put(f"{url}/datastore/image", files={"file": ("../../escaped.nii.gz", label)})
    assert r.status_code == 422, r.text  # a 3D file is not a 4D image; what matters: nothing written outside
    after = sorted(p.relative_to(server["tmp"]) for p in server["tmp"].rglob("*") if "logs" not in p.parts)
    assert [p for p in after if p not in before and "escaped" in str(p)] == []
    assert not list(server["tmp"].parent.rglob("escaped*"))
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=10).json()
    assert sorted(ds["objects"]) == IMAGES
    # active learning takes no client id: odd request fields do not leak into what it answers
    r = requests.post(f"{url}/activelearning/random", json={"image": "../etc/passwd", "label_tag": "../x"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] in IMAGES


def test_infer_params_cannot_name_server_files(server, tmp_path):
    url, studies = server["url"], server["studies"]
    # a real NIfTI image outside the datastore, in the server's temp folder (where uploads land)
    outside = server["server_tmp"] / f"outside_{os.getpid()}.nii.gz"
    shutil.copy(studies / "BRATS_001.nii.gz", outside)
    try:
        for params in ({"image": str(outside)}, {"label": str(outside)}, {"image": "BRATS_002"}):
            r = requests.post(f"{url}/infer/{ms.MODEL}", params={"image": "BRATS_001"}, data={"params": json.dumps(params)}, timeout=60)
            assert r.status_code == 400 and "params may not set" in r.text, (params, r.text)
        r = requests.post(f"{url}/infer/{ms.MODEL}", params={"image": str(outside)}, timeout=60)
        assert r.status_code == 400
        r = requests.post(f"{url}/infer/{ms.MODEL}", params={"image": "BRATS_001"}, data={"params": "[1, 2"}, timeout=60)
        assert r.status_code == 400
    finally:
        outside.unlink()
    # the upload path still works: the image file sent with the request (under the 1 MiB upload limit)
    r = requests.post(f"{url}/infer/{ms.MODEL}", params={"output": "json"}, data={"params": json.dumps({"crf": False})},
                      files={"file": ("upload.nii.gz", _small_image())}, timeout=300)
    assert r.status_code == 200, r.text


def test_refused_features_sessions_and_model_upload(server, tmp_path):
    url = server["url"]
    target = tmp_path / "written_by_archive.txt"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:  # MONAI Label unpacks session archives without member checks
        data = b"outside the session folder\n"
        member = tarfile.TarInfo("../" * 12 + str(target).lstrip("/"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    r = requests.put(f"{url}/session/", params={"uncompress": "true"}, files={"files": ("x.tar.gz", buf.getvalue())}, timeout=60)
    assert r.status_code == 406, r.text
    assert not target.exists()
    assert requests.get(f"{url}/session/abc", timeout=10).status_code == 406
    assert requests.post(f"{url}/infer/{ms.MODEL}", params={"session_id": "abc"}, timeout=60).status_code == 406

    weights = server["bundle"] / "models" / "model.pt"
    digest = _sha(weights.read_bytes())
    r = requests.put(f"{url}/model/{ms.MODEL}", files={"file": ("model.pt", b"not a model")}, timeout=60)
    assert r.status_code == 403, r.text
    assert requests.delete(f"{url}/model/{ms.MODEL}", timeout=60).status_code == 403
    assert weights.is_file() and _sha(weights.read_bytes()) == digest


# ------------------------------------------------------------------------------------ client errors and leftovers


def test_client_errors_are_4xx_with_the_reason_and_leave_no_temporary_file(server):
    url, studies, server_tmp = server["url"], server["studies"], server["server_tmp"]
    before = set(server_tmp.iterdir())

    def infer(params: dict | str, image="BRATS_001", **kw):
        data = {"params": params if isinstance(params, str) else json.dumps(params)}
        return requests.post(f"{url}/infer/{ms.MODEL}", params={"image": image, "output": "json"} if image else {"output": "json"},
                             data=data, timeout=300, **kw)

    three_d = _nifti_bytes(nib.Nifti1Image(np.ones((20, 20, 12), np.float32), np.eye(4)))
    expected = {  # what the client sent -> (status, words of the reason)
        "params not JSON": (infer("{crf: no"), 400, "params must be a JSON object"),
        "flag not a boolean": (infer({"crf": "maybe"}), 422, "crf must be true or false, got 'maybe'"),
        "mc_samples not a number": (infer({"uncertainty": True, "mc_samples": "many"}), 422, "mc_samples must be an integer"),
        "unknown strategy": (requests.post(f"{url}/activelearning/nope", json={}, timeout=60), 404, "unknown strategy 'nope'"),
        "upload that is not an image": (infer({}, image=None, files={"file": ("x.nii.gz", b"hello, not NIfTI")}), 415, "not a readable NIfTI file"),
        "3D upload, four sequences needed": (infer({}, image=None, files={"file": ("x.nii.gz", three_d)}), 422, "expected 4 image channels"),
        "refused image upload": (requests.put(f"{url}/datastore/image", params={"image": "JUNK"}, files={"file": ("junk.nii.gz", b"junk")}, timeout=60),
                                 415, "not a readable NIfTI file"),
        "refused label upload": (_put_label(url, "BRATS_001", three_d), 422, "label for image 'BRATS_001'"),
    }
    for what, (r, status, words) in expected.items():
        assert r.status_code == status and words in r.json()["detail"], (what, r.status_code, r.text[:300])
    # an image deleted from disk while the server runs
    r = requests.put(f"{url}/datastore/image", params={"image": "GONE_001"}, files={"file": ("GONE_001.nii.gz", _small_image())}, timeout=60)
    assert r.status_code == 200, r.text
    (studies / "GONE_001.nii.gz").unlink()
    r = infer({"crf": False}, image="GONE_001")
    assert r.status_code == 404 and "GONE_001" in r.json()["detail"], r.text[:300]
    # a dataset download (one labelled image), then nothing any of these requests sent or made stays behind
    assert _put_label(url, "BRATS_003", _label(studies, "BRATS_003", 2)).status_code == 200
    r = requests.get(f"{url}/datastore/dataset", timeout=120)
    assert r.status_code == 200 and r.content[:2] == b"PK", r.text[:300]
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200
    # a request's files are removed once its response is sent: allow a loaded machine a moment
    deadline = time.monotonic() + 10
    while (leftovers := [p.name for p in set(server_tmp.iterdir()) - before if p.is_file()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers == [], leftovers


# ------------------------------------------------------------------------------------ upload limit


def _raw_request(port: int, head: bytes, chunks=(), pause: float = 0.02) -> tuple[bytes, int]:
    """Send ``head`` then the chunks (HTTP chunked encoding), stopping as soon as the server answers;
    returns (answer, body bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([s], [], [], pause)[0]:
                break
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        answer = b""
        s.settimeout(30)
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 20:
            part = s.recv(65536)
            if not part:
                break
            answer += part
        return answer, sent


def test_upload_limit_refuses_before_reading(server):
    url, port, studies = server["url"], server["port"], server["studies"]
    # Content-Length of 10 GiB and no body at all: refused from the headers alone
    head = (b"PUT /datastore/label?image=BRATS_001&tag=final HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10737418240\r\n\r\n")
    t0 = time.monotonic()
    answer, _ = _raw_request(port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"max_upload_mb" in answer and time.monotonic() - t0 < 5
    # a streamed (chunked) body: the server stops reading once past 1 MiB
    head = (b"PUT /datastore/label?image=BRATS_001&tag=final HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    first = b'--b\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n\r\n'
    answer, sent = _raw_request(port, head, [first] + [b"\0" * 65536] * 200)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent <= 2 * 2**20, sent  # answered long before the 12.5 MiB were sent
    # an ordinary client upload over the limit (requests sends Content-Length)
    big = _nifti_bytes(nib.Nifti1Image(np.zeros((128, 128, 80), np.uint8), np.eye(4)), ".nii")  # 1.25 MiB
    r = _put_label(url, "BRATS_001", big, name="big.nii")
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]
    r = requests.post(f"{url}/infer/{ms.MODEL}", files={"file": ("big.nii", big)}, timeout=60)
    assert r.status_code == 413
    assert not (studies / "labels" / "final" / "BRATS_001.nii").exists()
    # under the limit it goes through, and the server is still up
    assert _put_label(url, "BRATS_001", _label(studies, "BRATS_001", 1)).status_code == 200
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------ SIGKILL


def test_sigkill_during_label_saves_then_clean_restart(server):
    """Three clients save labels in a loop (one image each, alternating .nii.gz and .nii, so the
    suffix switch is exercised) while the server is SIGKILLed. Each image must then hold its last
    acknowledged label or the one in flight, never a partial file; the server restarts on the same
    folder with a valid datastore_v2.json and no temporary file counted."""
    url, studies = server["url"], server["studies"]
    versions = {i: [(_label(studies, i, 10 * k + n, sfx), sfx) for k in range(4) for n, sfx in enumerate((".nii.gz", ".nii"))] for i in IMAGES}
    hashes = {i: [_sha(d) for d, _ in v] for i, v in versions.items()}
    acked = {i: None for i in IMAGES}
    in_flight = {i: None for i in IMAGES}
    counts = {i: 0 for i in IMAGES}
    stop = threading.Event()

    def client(image_id):
        k = 0
        while not stop.is_set():
            data, sfx = versions[image_id][k % len(versions[image_id])]
            in_flight[image_id] = k % len(versions[image_id])
            try:
                r = _put_label(url, image_id, data, name=f"label{sfx}", timeout=30)
            except requests.RequestException:
                return  # the server is gone
            if r.status_code != 200:
                raise AssertionError(f"{image_id}: {r.status_code} {r.text}")
            acked[image_id], in_flight[image_id] = in_flight[image_id], None
            counts[image_id] += 1
            k += 1

    with ThreadPoolExecutor(len(IMAGES)) as pool:
        futures = [pool.submit(client, i) for i in IMAGES]
        deadline = time.monotonic() + 60
        while min(counts.values()) < 3 and time.monotonic() < deadline and not any(f.done() for f in futures):
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng().uniform(0, 0.2)))
        ms.kill(server["proc"])
        stop.set()
        for f in futures:
            f.result()
    assert min(counts.values()) >= 3, counts

    # on disk, right after the kill: valid metadata, only complete labels under real names
    from monailabel.datastore.local import LocalDatastoreModel

    meta = LocalDatastoreModel.model_validate_json((studies / "datastore_v2.json").read_text())
    for image_id, obj in meta.objects.items():
        for tag, label in obj.labels.items():
            path = studies / "labels" / tag / f"{image_id}{label.ext}"
            assert path.is_file() and _sha(path.read_bytes()) in hashes[image_id], (image_id, tag)
    for path in (studies / "labels" / "final").glob("*.nii*"):
        if path.name.startswith("."):
            continue  # a temporary file of a write the kill interrupted: never registered, swept at restart
        image_id = path.name.split(".")[0]
        assert _sha(path.read_bytes()) in hashes[image_id], path
    # what a killed write leaves behind (simulated: the kill rarely lands inside one): temporary files
    (studies / "labels" / "final" / f"{TEMP_PREFIX}{'a' * 8}-BRATS_001.nii.gz").write_bytes(versions["BRATS_001"][0][0][:100])
    (studies / f"{TEMP_PREFIX}{'b' * 8}-datastore_v2.json").write_text('{"name": "half a fi')

    proc, info = ms.launch(server["tmp"], studies, server["bundle"], conf={"max_upload_mb": "1"}, log_name="server_restarted.log")
    server.update(proc=proc, **info)
    url = info["url"]
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=10).json()["objects"]
    assert sorted(ds) == IMAGES
    for image_id in IMAGES:
        allowed = {hashes[image_id][k] for k in (acked[image_id], in_flight[image_id]) if k is not None}
        assert "final" in ds[image_id]["labels"], image_id
        r = requests.get(f"{url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=60)
        assert r.status_code == 200 and _sha(r.content) in allowed, (image_id, acked[image_id], in_flight[image_id])
    leftovers = [p.name for p in studies.rglob(f"{TEMP_PREFIX}*")]
    assert leftovers == [], leftovers  # swept at start-up, never listed as labels
    stats = requests.get(f"{url}/datastore/", timeout=10).json()
    assert stats["total"] == 3 and stats["label_tags"] == {"final": 3}, stats
    json.loads((studies / "datastore_v2.json").read_text())
    assert _put_label(url, "BRATS_002", versions["BRATS_002"][0][0]).status_code == 200  # fully working again


# ------------------------------------------------------------------------------------ authentication


class _IdentityProvider:
    """A realm on loopback answering ``GET /realms/<realm>`` with ``{"public_key": <base64 DER>}``
    like Keycloak (what MONAI Label's ``get_public_key`` reads), for an RSA key made here."""

    def __init__(self, realm="brats"):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.public_pem = self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        der = self.key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        body = json.dumps({"realm": realm, "public_key": base64.b64encode(der).decode(), "tokens-not-before": 0}).encode()
        self.requests = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                idp.requests += 1
                if self.path.rstrip("/") != f"/realms/{realm}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm_uri = f"http://127.0.0.1:{self.httpd.server_address[1]}/realms/{realm}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, roles, username="alice", lifetime=600, key=None, **claims) -> str:
        import jwt

        now = int(time.time())
        payload = {"preferred_username": username, "email": f"{username}@example.org", "name": username.title(),
                   "realm_access": {"roles": list(roles)}, "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, key or self.private_pem, algorithm="RS256", headers={"kid": "test"})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


USER, ANNOTATOR, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-admin"


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def idp():
    provider = _IdentityProvider()
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, idp):
    tmp = tmp_path_factory.mktemp("mlapp_auth")
    write_dataset(tmp / "msd", 3, seed=1, layout="msd", size="small")
    studies = tmp / "studies"
    studies.mkdir()
    for f in sorted((tmp / "msd" / "imagesTr").glob("*.nii.gz")):
        shutil.copy(f, studies / f.name)
    bundle = ms.bundle_copy(tmp / "bundle", with_weights=True)
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm_uri}
    admin = idp.token([USER, ANNOTATOR, ADMIN], username="root")
    proc, info = ms.launch(tmp, studies, bundle, env=env, ready_headers=_bearer(admin))
    try:
        yield {**info, "proc": proc}
    finally:
        ms.stop(proc)


def test_monai_label_own_token_check_refuses_every_token_under_pyjwt2(idp):
    """Why lib/security.py replaces ``from_token``: MONAI Label 0.8.5 calls ``jwt.decode`` without
    ``algorithms``; PyJWT 2 then refuses even a correctly signed token (so auth on = 401 for all)."""
    import jwt
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    saved = settings.MONAI_LABEL_AUTH_ENABLE, settings.MONAI_LABEL_AUTH_REALM_URI
    settings.MONAI_LABEL_AUTH_ENABLE, settings.MONAI_LABEL_AUTH_REALM_URI = True, idp.realm_uri
    try:
        token = idp.token([USER])
        with pytest.raises(jwt.DecodeError, match="algorithms"):
            auth.from_token(token)
        from lib.security import verify_token

        user = verify_token(token)
        assert user.username == "alice" and user.roles == [USER]
    finally:
        settings.MONAI_LABEL_AUTH_ENABLE, settings.MONAI_LABEL_AUTH_REALM_URI = saved


def test_auth_on_unauthenticated_gets_401_signed_token_with_roles_succeeds(auth_server, idp):
    url, studies = auth_server["url"], auth_server["studies"]
    label = _label(studies, "BRATS_001", 3)
    image = (studies / "BRATS_002.nii.gz").read_bytes()

    def infer(headers):
        return requests.post(f"{url}/infer/{ms.MODEL}", params={"image": "BRATS_001", "output": "json"},
                             data={"params": json.dumps({"crf": False})}, headers=headers, timeout=300)

    def train(headers):
        return requests.post(f"{url}/train/{ms.MODEL}", json={"max_epochs": 1, "val_split": 0.5}, headers=headers, timeout=60)

    def upload_label(headers):
        return _put_label(url, "BRATS_001", label, headers=headers)

    def upload_image(headers):
        return requests.put(f"{url}/datastore/image", params={"image": "NEW_001"}, files={"file": ("NEW_001.nii.gz", image)}, headers=headers, timeout=60)

    calls = {"infer": infer, "train": train, "upload label": upload_label, "upload image": upload_image}
    other_key = _IdentityProvider()
    other_key.close()
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"preferred_username": "mallory", "realm_access": {"roles": [ADMIN, ANNOTATOR, USER]}, "exp": int(time.time()) + 600}).encode())
    hs256 = f"{header}.{body}." + _b64(hmac.new(idp.public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())  # key confusion
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{body}."
    everything = [USER, ANNOTATOR, ADMIN]
    refused = {
        "no token": None,
        "garbage": _bearer("not-a-jwt"),
        "other key": _bearer(idp.token(everything, key=other_key.private_pem)),
        "expired": _bearer(idp.token(everything, lifetime=-60)),
        "no exp": _bearer(idp.token(everything, exp=None)),
        "HS256 with the public key": _bearer(hs256),
        "alg none": _bearer(unsigned),
    }
    for what, headers in refused.items():
        for name, call in calls.items():
            r = call(headers)
            assert r.status_code == 401, (what, name, r.status_code, r.text[:200])
    assert not (studies / "labels" / "final" / "BRATS_001.nii.gz").exists()
    assert not (studies / "NEW_001.nii.gz").exists()

    # roles: a plain user may infer but not save labels (directly or through /infer) or train
    user = _bearer(idp.token([USER], username="uma"))
    assert infer(user).status_code == 200
    assert upload_label(user).status_code == 403
    r = requests.post(f"{url}/infer/{ms.MODEL}", params={"image": "BRATS_001", "output": "json"}, headers=user, timeout=300,
                      data={"params": json.dumps({"crf": False, "save_label": True, "label_tag": "by_uma"})})
    assert r.status_code == 403 and "annotator" in r.json()["detail"], r.text[:300]
    assert not (studies / "labels" / "by_uma").exists()
    assert train(user).status_code == 403
    # an annotator saves labels; an admin trains
    annotator = _bearer(idp.token([USER, ANNOTATOR], username="anna"))
    assert upload_label(annotator).status_code == 200
    assert (studies / "labels" / "final" / "BRATS_001.nii.gz").is_file()
    assert _put_label(url, "BRATS_002", _label(studies, "BRATS_002", 4), headers=annotator).status_code == 200
    admin = _bearer(idp.token(everything, username="root"))
    r = train(admin)
    assert r.status_code == 200, r.text
    r = train(admin)  # a second request while the first runs
    assert r.status_code == 409 and "already running" in r.json()["detail"], r.text[:300]
    r = requests.delete(f"{url}/train/", headers=admin, timeout=60)  # stop it: only the authorisation is under test
    assert r.status_code == 200, r.text
    assert requests.get(f"{url}/info/", timeout=10).status_code == 401
    assert requests.get(f"{url}/info/", headers=user, timeout=10).status_code == 200
    assert idp.requests >= 1  # the server fetched the realm's key from the identity provider


def test_a_save_killed_between_its_record_and_the_old_file_keeps_the_recorded_label(tmp_path):
    """A label saved with the other suffix (.nii after .nii.gz) is copied, recorded, and only then is the old file
    dropped: a kill in between leaves both files, and a restart serves the recorded one (the last acknowledged or the
    one in flight), never the older file because its suffix comes first."""
    from conftest import BRATS_AFFINE, toy_label, write_toy_dataset

    from lib.datastore.brats import open_datastore

    write_toy_dataset(tmp_path / "studies", "brats2021", n=1)
    store, _ = open_datastore(str(tmp_path / "studies"))
    image_id = store.list_images()[0]
    versions = []
    for k, suffix in enumerate((".nii.gz", ".nii")):
        lab = toy_label()
        lab[0, 0, k] = 2  # one voxel of oedema more: another file
        path = tmp_path / f"upload{k}{suffix}"
        nib.save(nib.Nifti1Image(lab, BRATS_AFFINE), path)
        versions.append(path)
    store.save_label(image_id, str(versions[0]), "final", {})
    store.save_label(image_id, str(versions[1]), "final", {})
    labels = tmp_path / "studies" / "labels" / "final"
    assert sorted(p.name for p in labels.iterdir() if not p.name.startswith(".")) == [f"{image_id}.nii"]
    shutil.copy(versions[0], labels / f"{image_id}.nii.gz")  # the older file, as a kill before its removal leaves it
    restarted, _ = open_datastore(str(tmp_path / "studies"))
    uri = restarted.get_label_uri(image_id, "final")
    assert uri.endswith(f"{image_id}.nii") and np.array_equal(np.asarray(nib.load(uri).dataobj), np.asarray(nib.load(versions[1]).dataobj))
