"""A real signing service (examples/signing_service.py: Starlette under uvicorn, its own
process) driven over HTTP by concurrent clients through a total loss of the HSM group."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from prometheus_client.parser import text_string_to_metric_families

from conftest import EC_KEY, child_env, gone, repo_root, wait_until
from p11guard.testbed import Testbed

CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def service(config: Path, log: Path) -> Iterator[str]:
    """Start the service as its own process; stop it (and the guard's hosts) by pid."""
    port = _free_port()
    env = {**child_env(), "P11GUARD_CONFIG": str(config), "SIGNING_KEY": EC_KEY}
    command = [sys.executable, "-m", "uvicorn", "signing_service:create_app", "--factory"]
    command += ["--app-dir", str(repo_root() / "examples"), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: proc.poll() is not None or _answers(base), 60, "the service to answer")
        assert proc.poll() is None, f"the service exited with {proc.returncode}: {log.read_text()[-3000:]}"
        yield base
    finally:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        proc.terminate()  # uvicorn's shutdown closes the guard, which stops its hosts
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:
            if not gone(child.pid):
                child.kill()
        for child in children:
            wait_until(lambda c=child: gone(c.pid), 10, f"process {child.pid} of the service to be gone")


@dataclass
class Clients:
    """Threads posting /sign until stopped; every answer kept."""

    base: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: (sent, answered, data, status, body) each
    answers: list[tuple[float, float, bytes, int, dict[str, str]]] = field(default_factory=list)

    def run(self, n: int) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                if self.once(client, b"request %d-%d" % (n, i)) == 503:
                    self.stop.wait(0.05)  # a polite client backs off (Retry-After)
                i += 1

    def once(self, client: httpx.Client, data: bytes) -> int:
        sent = time.time()
        reply = client.post("/sign", content=data)
        with self.lock:
            self.answers.append((sent, time.time(), data, reply.status_code, reply.json()))
        return reply.status_code

    def burst(self, name: str) -> list[threading.Thread]:
        """One request from each of ``CLIENTS`` new clients, now."""

        def one(n: int) -> None:
            with httpx.Client(base_url=self.base, timeout=120) as client:
                self.once(client, b"%s %d" % (name.encode(), n))

        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads

    def count(self, status: int, after: float = 0.0) -> int:
        with self.lock:
            return sum(1 for _, t, _, s, _ in self.answers if s == status and t >= after)


@dataclass
class Watch:
    """/healthz asked again and again: (time, status) each."""

    base: str
    stop: threading.Event = field(default_factory=threading.Event)
    seen: list[tuple[float, int]] = field(default_factory=list)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.wait(0.05):
                self.seen.append((time.time(), client.get("/healthz").status_code))


def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def queue_depth(base: str) -> float:
    return metrics(base)[("p11guard_queue_depth", ())]


def through_an_outage(base: str, group: Testbed, policy: str) -> tuple[Clients, Watch, float, float]:
    """Clients and a health watcher run while the whole group is lost, then restored; while
    it is lost (``/healthz`` 503), new clients send a request each. Returns the clients, the
    watcher, the time of the loss and of the restore."""
    clients, watch = Clients(base), Watch(base)
    threads = [threading.Thread(target=clients.run, args=(n,), daemon=True) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=watch.run, daemon=True))
    for t in threads:
        t.start()
    try:
        wait_until(lambda: clients.count(200) >= 40, 60, "signatures before the loss")
        lost_at = time.time()
        group.fault("lose")
        wait_until(lambda: any(s == 503 and t > lost_at for t, s in watch.seen), 30, "/healthz to say 503")
        burst = clients.burst("during the outage")
        threads += burst
        if policy == "queue":  # the loop's clients and the new ones all wait in the queue
            wait_until(lambda: queue_depth(base) >= 2 * CLIENTS, 30, "the requests to wait in the queue")
        else:
            wait_until(lambda: not any(t.is_alive() for t in burst), 30, "the refusals")
        restored_at = time.time()
        group.fault("restore")
        wait_until(lambda: any(s == 200 and t > restored_at for t, s in watch.seen), 30, "/healthz 200 again")
        wait_until(lambda: clients.count(200, after=restored_at) >= 40, 60, "signatures after the recovery")
    finally:
        clients.stop.set()
        watch.stop.set()
        for t in threads:
            t.join(150)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    return clients, watch, lost_at, restored_at


def verify_all(base: str, clients: Clients) -> int:
    key = load_pem_public_key(httpx.get(f"{base}/public-key", timeout=30).content)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    ok = [(data, body) for _, _, data, status, body in clients.answers if status == 200]
    for data, body in ok:
        key.verify(base64.b64decode(body["signature"]), data, ec.ECDSA(hashes.SHA256()))
    return len(ok)


def test_queue_policy_every_request_succeeds_through_a_total_loss(group: Testbed, tmp_path: Path) -> None:
    with service(group.config_path, tmp_path / "service.log") as base:
        clients, watch, lost_at, restored_at = through_an_outage(base, group, "queue")
        statuses = {status for *_, status, _ in clients.answers}
        assert statuses == {200}, f"answers other than 200: {statuses}"
        during = [a for a in clients.answers if a[2].startswith(b"during the outage")]
        assert len(during) == CLIENTS and all(lost_at < sent < restored_at < done for sent, done, *_ in during)
        first_503 = min(t for t, s in watch.seen if s == 503 and t > lost_at)
        assert all(s == 503 for t, s in watch.seen if first_503 <= t < restored_at)
        signed = verify_all(base, clients)
        assert signed == len(clients.answers)
        m = metrics(base)
        assert m[("p11guard_group_losses_total", ())] == 1
        assert m[("p11guard_recoveries_total", ())] == 1
        assert m[("p11guard_serving", ())] == 1
        assert m[("p11guard_operations_total", (("op", "sign"), ("outcome", "ok")))] == signed
        assert m[("p11guard_outage_duration_seconds_count", ())] == 1


def test_fail_fast_answers_503_never_500_and_health_says_503_until_it_serves(group: Testbed, tmp_path: Path) -> None:
    config = tmp_path / "fail-fast.toml"
    config.write_text(group.config_path.read_text() + '\n[admission]\npolicy = "fail_fast"\n')
    with service(config, tmp_path / "service.log") as base:
        clients, watch, lost_at, restored_at = through_an_outage(base, group, "fail_fast")
        statuses = {status for *_, status, _ in clients.answers}
        assert statuses == {200, 503}, f"expected 200 and 503 only, got {statuses}"
        refused = [body for *_, status, body in clients.answers if status == 503]
        assert all("out of service" in body["error"] for body in refused), refused[:3]
        first_503 = min(t for t, s in watch.seen if s == 503 and t > lost_at)
        assert all(s == 503 for t, s in watch.seen if first_503 <= t < restored_at)
        signed = verify_all(base, clients)
        m = metrics(base)
        assert m[("p11guard_group_losses_total", ())] == 1
        assert m[("p11guard_recoveries_total", ())] == 1
        assert m[("p11guard_operations_total", (("op", "sign"), ("outcome", "ok")))] == signed
        assert m[("p11guard_operations_total", (("op", "sign"), ("outcome", "out_of_service")))] == len(refused)
