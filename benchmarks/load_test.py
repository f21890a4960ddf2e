"""Bounded load test of the MONAI Label app: concurrent inference requests and label saves.

Three phases, ``--concurrency`` clients each, a mix of ``POST /infer/brats`` and ``PUT
/datastore/label`` (``--label-fraction``) on 127.0.0.1:

1. ``--train``: ``POST /train/brats``, then waves of ``--concurrency`` requests for as long as the
   training job runs (it must finish ``DONE``, and inference requests must have run meanwhile);
2. ``--warmup`` requests (default 32): one-off allocations (the model reloaded after training,
   caches, allocator arenas of the worker threads) happen here;
3. the measured ``--requests``, in two halves; the server's resident memory (RSS) is read after
   the warm-up and when each half has finished (no request in flight). Growth per request = the
   smaller of the two halves' growth / (requests / 2): a per-request leak grows both, while a
   one-off allocation (a model reload, a thread's new allocator arena; 40 MiB was seen once)
   grows one. Default tolerance 1 MiB per request (an inference result left behind is about
   7 MiB on the small synthetic volumes).

Prints requests, failures, p50/p95 latency of the measured phase, failures of every phase, peak
RSS and the growth per request. Exit status 1 if any request failed or got no answer, the memory
grew by more than ``--max-growth-mb-per-request``, or the training job failed.

Latency is mostly queueing: MONAI Label 0.8.5's endpoints are ``async`` functions that do their
work (inference, label checks) without leaving the event loop, so one server process answers one
request at a time; the clients' concurrency becomes a queue (a label save waits behind the
inferences sent before it). Training runs in its own process.

    # its own server on a free loopback port (synthetic studies, tiny untrained network)
    python -m benchmarks.load_test --start-server --requests 100 --concurrency 16 --train
    # a running server (RSS read from the process listening on the port, same machine)
    python -m benchmarks.load_test --url http://127.0.0.1:8000 --requests 200 --concurrency 16
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import psutil
import requests

MODEL = "brats"
MiB = 2**20
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def server_process(url: str, pid: int | None) -> psutil.Process:
    """The process serving ``url`` (``pid``, or the one listening on its port)."""
    if pid:
        return psutil.Process(pid)
    port = urlparse(url).port
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise SystemExit(f"no process listening on port {port} found: pass --pid")


class RssSampler(threading.Thread):
    """Samples the server's RSS (and that of its children, e.g. training) every ``interval`` s."""

    def __init__(self, proc: psutil.Process, interval: float = 0.1):
        super().__init__(daemon=True)
        self.proc, self.interval = proc, interval
        self.peak = self.peak_children = 0
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def run(self):
        while not self._halt.is_set():
            try:
                rss = self.rss()
                children = sum(c.memory_info().rss for c in self.proc.children(recursive=True) if c.is_running())
            except psutil.Error:
                rss, children = 0, 0
            self.samples.append((time.monotonic(), rss))
            self.peak = max(self.peak, rss)
            self.peak_children = max(self.peak_children, rss + children)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def nifti_bytes(img) -> bytes:
    import gzip

    buf = io.BytesIO()
    holder = nib.FileHolder(fileobj=buf)
    img.to_file_map({"header": holder, "image": holder})
    return gzip.compress(buf.getvalue(), compresslevel=1)


def make_labels(url: str, images: list[str], values: list[int], per_image: int, seed: int = 0) -> dict[str, list[bytes]]:
    """``per_image`` valid label files for each image, in its grid (from ``GET /datastore/image``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for image_id in images:
        r = requests.get(f"{url}/datastore/image", params={"image": image_id}, timeout=120)
        r.raise_for_status()
        with tempfile.NamedTemporaryFile(suffix=".nii.gz") as f:
            f.write(r.content)
            f.flush()
            img = nib.load(f.name)
            shape, affine = img.shape[:3], img.affine
        labels = []
        for _ in range(per_image):
            lab = np.zeros(shape, np.uint8)
            for v in values:
                x, y, z = (int(rng.integers(0, max(1, s - 8))) for s in shape)
                lab[x:x + 8, y:y + 8, z:z + 6] = v
            labels.append(nifti_bytes(nib.Nifti1Image(lab, affine)))
        out[image_id] = labels
    return out


def one_request(url: str, i: int, kind: str, image_id: str, label: bytes | None, crf: bool, timeout: float) -> dict:
    t0, wall0 = time.monotonic(), time.time()
    try:
        if kind == "infer":
            r = requests.post(f"{url}/infer/{MODEL}", params={"image": image_id, "output": "json"},
                              data={"params": json.dumps({"crf": crf})}, timeout=timeout)
            ok = r.status_code == 200 and "label_names" in r.json()
        else:
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": ("label.nii.gz", label)}, timeout=timeout)
            ok = r.status_code == 200 and r.json().get("image") == image_id
        return {"i": i, "kind": kind, "status": r.status_code, "ok": ok, "latency": time.monotonic() - t0,
                "start": wall0, "end": time.time(), "error": None if ok else r.text[:300]}
    except (requests.RequestException, ValueError) as e:
        return {"i": i, "kind": kind, "status": None, "ok": False, "latency": time.monotonic() - t0, "start": wall0,
                "end": time.time(), "error": f"{type(e).__name__}: {e}"[:300]}


def training_status(url: str) -> dict:
    try:
        return requests.get(f"{url}/train/", timeout=30).json()
    except (requests.RequestException, ValueError) as e:
        return {"status": f"unreachable: {e}"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def growth_per_request(rss_mib: list[float], requests: tuple[int, int]) -> float:
    """Memory growth a request (MiB) that both halves of the measured requests show: ``rss_mib`` is the server's RSS
    after the warm-up and after each half, ``requests`` the halves' sizes. A leak grows both halves, a one-off
    allocation one: the smaller growth counts."""
    return min((rss_mib[k + 1] - rss_mib[k]) / max(1, requests[k]) for k in range(2))


def run_load(url: str, proc: psutil.Process, n_requests: int, concurrency: int, label_fraction: float, train: bool,
             train_epochs: int, crf: bool, timeout: float, max_growth: float, warmup: int, seed: int = 0) -> dict:
    info = requests.get(f"{url}/info/", timeout=30).json()
    values = sorted(info["models"][MODEL]["labels"].values())
    ds = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    images = sorted(ds)
    if not images:
        raise SystemExit("the server has no images")
    labels = make_labels(url, images, values, per_image=3, seed=seed)
    log(f"{len(images)} images, label files ready")

    rng = np.random.default_rng(seed)

    def requests_from(i0: int, n: int) -> list[tuple[int, str, str]]:
        return [(i, "label" if rng.random() < label_fraction else "infer", images[i % len(images)]) for i in range(i0, i0 + n)]

    sampler = RssSampler(proc)
    sampler.start()
    rss_start = sampler.rss()
    results: list[dict] = []

    def send(pool: ThreadPoolExecutor, batch: list[tuple[int, str, str]], phase: str) -> list[dict]:
        futures = [pool.submit(one_request, url, i, kind, image_id, labels[image_id][i % 3] if kind == "label" else None,
                               crf, timeout) for i, kind, image_id in batch]
        out = [{**f.result(), "phase": phase} for f in futures]  # waits for every request of the batch
        results.extend(out)
        return out

    train_info = {"requested": train}
    sent = 0
    with ThreadPoolExecutor(concurrency) as pool:
        if train:  # every image needs a final label first (the training datalist); these saves are set-up, not counted
            for image_id in images:
                requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": ("label.nii.gz", labels[image_id][0])}, timeout=120).raise_for_status()
            r = requests.post(f"{url}/train/{MODEL}", json={"max_epochs": train_epochs, "val_split": 0.34}, timeout=60)
            train_info.update(post_status=r.status_code, post_answer=r.text[:300])
            log(f"POST /train/{MODEL}: {r.status_code}")
            # phase 1: waves of `concurrency` requests for as long as the training job runs
            deadline = time.monotonic() + max(600.0, timeout)
            while r.status_code == 200 and time.monotonic() < deadline:
                send(pool, requests_from(sent, concurrency), "training")
                sent += concurrency
                if str(training_status(url).get("status")) not in ("SUBMITTED", "RUNNING"):
                    break
            final = training_status(url)
            log(f"training {final.get('status')}; {sent} requests sent while it ran")
            # the training's time window as the server saw it (its start_ts / end_ts, local time, 1 s resolution)
            window = [time.mktime(time.strptime(final[k], "%Y-%m-%d %H:%M:%S")) for k in ("start_ts", "end_ts") if final.get(k)]
            during = [r for r in results if r["kind"] == "infer" and len(window) == 2 and r["end"] >= window[0] and r["start"] <= window[1] + 1]
            train_info.update(final_status=final.get("status"), start_ts=final.get("start_ts"), end_ts=final.get("end_ts"),
                              details_tail=(final.get("details") or [])[-3:], requests_sent=sent,
                              infer_while_training=len(during), infer_failed_while_training=sum(not r["ok"] for r in during))
        # phase 2: warm-up (model reload after training, caches, allocator arenas of the worker threads)
        if warmup:
            send(pool, requests_from(sent, warmup), "warmup")
            sent += warmup
            log(f"{warmup} warm-up requests answered, server RSS {sampler.rss() / MiB:.0f} MiB")
        # phase 3: the measured requests, in two halves; RSS read after the warm-up and when each half has finished
        rss_after = [sampler.rss()]
        t0 = time.monotonic()
        for n in (n_requests // 2, n_requests - n_requests // 2):
            send(pool, requests_from(sent, n), "measured")
            sent += n
            rss_after.append(sampler.rss())
            measured = [r for r in results if r["phase"] == "measured"]
            log(f"{len(measured)} measured requests answered, {sum(not r['ok'] for r in measured)} failed, "
                f"server RSS {rss_after[-1] / MiB:.0f} MiB")
        wall = time.monotonic() - t0
    sampler.stop()

    growth = growth_per_request([v / MiB for v in rss_after], (n_requests // 2, n_requests - n_requests // 2))
    measured = [r for r in results if r["phase"] == "measured"]
    failures = [r for r in results if not r["ok"]]
    by_kind = {}
    for kind in ("infer", "label"):
        lat = [r["latency"] for r in measured if r["kind"] == kind]
        by_kind[kind] = {"requests": len(lat), "failures": sum(1 for r in failures if r["kind"] == kind and r["phase"] == "measured"),
                         "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95)}
    lat = [r["latency"] for r in measured]
    report = {
        "url": url, "requests": n_requests, "answered": sum(r["status"] is not None for r in measured),
        "failures": sum(1 for r in failures if r["phase"] == "measured"), "concurrency": concurrency, "wall_s": wall,
        "throughput_rps": n_requests / wall if wall else 0,
        "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "by_kind": by_kind,
        "all_requests": len(results), "all_answered": sum(r["status"] is not None for r in results), "all_failures": len(failures),
        "warmup_requests": warmup,
        "rss_start_mib": rss_start / MiB, "rss_after_warmup_mib": rss_after[0] / MiB,
        "rss_after_first_half_mib": rss_after[1] / MiB, "rss_after_second_half_mib": rss_after[2] / MiB,
        "rss_peak_mib": sampler.peak / MiB, "rss_peak_with_children_mib": sampler.peak_children / MiB,
        "rss_growth_mib_per_request": growth, "max_growth_mib_per_request": max_growth,
        "training": train_info, "failure_samples": failures[:5],
    }
    report["passed"] = (not failures and report["all_answered"] == len(results) and report["answered"] == n_requests
                        and growth <= max_growth
                        and (not train or (train_info.get("post_status") == 200 and train_info.get("final_status") == "DONE"
                                           and train_info.get("infer_while_training", 0) > 0)))
    return report


def print_report(rep: dict) -> None:
    print(f"server {rep['url']}: {rep['requests']} requests, concurrency {rep['concurrency']}, {rep['wall_s']:.1f} s "
          f"({rep['throughput_rps']:.2f} req/s)")
    print(f"  answered {rep['answered']}/{rep['requests']}, failures {rep['failures']} "
          f"(all phases: {rep['all_answered']}/{rep['all_requests']} answered, {rep['all_failures']} failed)")
    print(f"  latency p50 {rep['p50_s']:.2f} s, p95 {rep['p95_s']:.2f} s")
    for kind, k in rep["by_kind"].items():
        print(f"    {kind:5s}: {k['requests']:4d} requests, {k['failures']} failed, p50 {k['p50_s']:.2f} s, p95 {k['p95_s']:.2f} s")
    print(f"  server RSS: start {rep['rss_start_mib']:.0f} MiB, after the warm-up {rep['rss_after_warmup_mib']:.0f} MiB, "
          f"after half 1 {rep['rss_after_first_half_mib']:.0f} MiB, "
          f"after half 2 {rep['rss_after_second_half_mib']:.0f} MiB, peak {rep['rss_peak_mib']:.0f} MiB "
          f"(with child processes {rep['rss_peak_with_children_mib']:.0f} MiB)")
    print(f"  RSS growth {rep['rss_growth_mib_per_request']:+.3f} MiB/request (the smaller half's) "
          f"(tolerance {rep['max_growth_mib_per_request']} MiB/request; after {rep['warmup_requests']} warm-up requests)")
    t = rep["training"]
    if t.get("requested"):
        print(f"  training: POST {t.get('post_status')}, final status {t.get('final_status')}, "
              f"({t.get('start_ts')} .. {t.get('end_ts')}); {t.get('infer_while_training')} inference requests ran while it did, "
              f"{t.get('infer_failed_while_training')} of them failed ({t.get('requests_sent')} requests sent while it ran)")
    for f in rep["failure_samples"]:
        print(f"  FAILED #{f['i']} {f['kind']}: {f['status']} {f['error']}")
    print("PASSED" if rep["passed"] else "FAILED")


def start_own_server(workdir: Path, cases: int):
    from custom.synthetic import write_dataset
    from devtools import mlapp_server as ms

    write_dataset(workdir / "msd", cases, seed=0, layout="msd", size="small")
    studies = workdir / "studies"
    studies.mkdir()
    for f in sorted((workdir / "msd" / "imagesTr").glob("*.nii.gz")):
        shutil.copy(f, studies / f.name)
    # the tests' tiny settings, with the smallest network of the bundle's tests (one block a stage)
    overrides = {**ms.OVERRIDES, "use_crf": False, "feature_size": 12, "depths": [1, 1, 1, 1]}
    bundle = ms.bundle_copy(workdir / "bundle", with_weights=True, overrides=overrides)
    return ms.launch(workdir, studies, bundle, overrides=overrides)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (same machine: its RSS is read)")
    where.add_argument("--start-server", action="store_true", help="start a server on a free 127.0.0.1 port (synthetic studies, tiny network)")
    p.add_argument("--pid", type=int, help="server process id (default: the process listening on the URL's port)")
    p.add_argument("--cases", type=int, default=4, help="synthetic images for --start-server")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--label-fraction", type=float, default=0.5, help="share of label saves (the rest: inference)")
    p.add_argument("--train", action="store_true", help="run POST /train/brats during the load and require it to finish DONE")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--crf", action="store_true", help="inference with the dense CRF (slower)")
    p.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    p.add_argument("--max-growth-mb-per-request", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=32, help="requests after the training phase, before the measured ones")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--workdir", type=Path, help="for --start-server (default: a temporary folder, removed afterwards)")
    args = p.parse_args(argv)
    if args.requests < 2 or args.concurrency < 1:
        p.error("--requests >= 2 and --concurrency >= 1")

    server = None
    tmp = None
    try:
        if args.start_server:
            from devtools import mlapp_server as ms

            workdir = args.workdir or Path(tmp := tempfile.mkdtemp(prefix="load_test_"))
            workdir.mkdir(parents=True, exist_ok=True)
            server, info = start_own_server(workdir, args.cases)
            log(f"server up at {info['url']} (log {info['log']})")
            url = info["url"]
            proc = server_process(url, None)
        else:
            url = args.url.rstrip("/")
            proc = server_process(url, args.pid)
        report = run_load(url, proc, args.requests, args.concurrency, args.label_fraction, args.train, args.train_epochs,
                          args.crf, args.timeout, args.max_growth_mb_per_request, args.warmup)
    finally:
        if server is not None:
            ms.stop(server)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
