"""Prometheus metrics of a guard: the values a dashboard and an alert rely on."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import EC_KEY, NOT_SERVING, guard, state_in, wait_until
from p11guard import Config, OutOfService, UserError
from p11guard.metrics import register, serve_metrics
from p11guard.testbed import Testbed


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition, parsed back: (name, labels) -> value."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry).get((name, tuple(sorted(labels.items()))), 0.0)


def test_operations_counted_by_op_and_outcome(net_config: Config) -> None:
    with guard(net_config) as g:
        registry = CollectorRegistry()
        register(g, registry)
        for i in range(25):
            g.sign(EC_KEY, b"%d" % i)
        g.sign_many(EC_KEY, [b"a", b"b", b"c"])
        with pytest.raises(UserError):
            g.sign("no-such-key", b"x")
        g.random(8)
        assert value(registry, "p11guard_operations_total", op="sign", outcome="ok") == 28
        assert value(registry, "p11guard_operations_total", op="sign", outcome="user_error") == 1
        assert value(registry, "p11guard_operations_total", op="random", outcome="ok") == 1
        assert value(registry, "p11guard_operation_duration_seconds_count", op="sign") == 26
        assert value(registry, "p11guard_operation_duration_seconds_count", op="batch") == 1
        assert value(registry, "p11guard_operation_duration_seconds_bucket", op="sign", le="+Inf") == 26
        assert value(registry, "p11guard_operation_duration_seconds_sum", op="sign") > 0
        assert value(registry, "p11guard_state", state="SERVING") == 1
        assert value(registry, "p11guard_state", state="LOST") == 0
        assert value(registry, "p11guard_serving") == 1
        assert value(registry, "p11guard_members_serving") == value(registry, "p11guard_members") == 1
        assert value(registry, "p11guard_member_state", member="default", state="serving") == 1
        assert value(registry, "p11guard_queue_depth") == 0
        assert value(registry, "p11guard_group_losses_total") == 0
        assert value(registry, "p11guard_workers", status="idle") == 2
        assert value(registry, "p11guard_probes_total", outcome="ok") >= 1
        assert value(registry, "p11guard_last_probe_ok", member="default") == 1


def test_loss_and_recovery_in_the_metrics(net_config: Config, group: Testbed) -> None:
    with guard(net_config.replace(policy="fail_fast")) as g:
        registry = CollectorRegistry()
        register(g, registry)
        g.sign(EC_KEY, b"before")
        group.fault("lose")
        wait_until(lambda: state_in(g, "LOST", "RECOVERING"), 15, "the loss")
        assert value(registry, "p11guard_serving") == 0
        assert value(registry, "p11guard_group_losses_total") == 1
        assert value(registry, "p11guard_recoveries_total") == 0
        assert sum(value(registry, "p11guard_state", state=s) for s in NOT_SERVING) == 1
        refused = 0
        for i in range(5):
            with pytest.raises(OutOfService):
                g.sign(EC_KEY, b"refused %d" % i)
            refused += 1
        assert value(registry, "p11guard_operations_total", op="sign", outcome="out_of_service") >= refused
        group.fault("restore")
        wait_until(lambda: g.state == "SERVING", 20, "SERVING again")
        g.sign(EC_KEY, b"after")
        assert value(registry, "p11guard_serving") == 1
        assert value(registry, "p11guard_group_losses_total") == 1
        assert value(registry, "p11guard_recoveries_total") == 1
        assert value(registry, "p11guard_generation") == 1
        assert value(registry, "p11guard_outage_duration_seconds_count") == 1
        assert value(registry, "p11guard_outage_duration_seconds_sum") > 0
        assert value(registry, "p11guard_time_to_recover_seconds_count") == 1
        assert value(registry, "p11guard_member_outage_duration_seconds_count", member="default") == 1
        assert value(registry, "p11guard_host_restarts_total") >= 1
        assert value(registry, "p11guard_probes_total", outcome="failed") >= 1
        assert value(registry, "p11guard_login_failures_total") == 0
        status = g.status()
        outage = status["outages"][0]
        assert 0 <= outage["recover_s"] <= outage["duration_s"]
        assert value(registry, "p11guard_operations_total", op="sign", outcome="ok") == status["counters"]["ops_ok"]


def test_a_registry_per_guard_and_a_clear_clash(net_config: Config) -> None:
    with guard(net_config.replace(workers=1)) as a, guard(net_config.replace(workers=1)) as b:
        ra, rb = CollectorRegistry(), CollectorRegistry()
        register(a, ra)
        register(b, rb)
        a.sign(EC_KEY, b"a")
        assert value(ra, "p11guard_operations_total", op="sign", outcome="ok") == 1
        assert value(rb, "p11guard_operations_total", op="sign", outcome="ok") == 0
        with pytest.raises(ValueError, match="registry of its own"):
            register(b, ra)
        metrics = register(b, CollectorRegistry())
        metrics.unregister()
        assert samples(metrics.registry) == {}


def test_serve_metrics_for_a_script(net_config: Config) -> None:
    with guard(net_config.replace(workers=1)) as g:
        registry = CollectorRegistry()
        register(g, registry)
        g.sign(EC_KEY, b"x")
        server = serve_metrics(registry, port=0)
        try:
            reply = httpx.get(server.url, timeout=10)
            assert reply.status_code == 200
            assert 'p11guard_operations_total{op="sign",outcome="ok"} 1.0' in reply.text
        finally:
            server.stop()
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url, timeout=2)


def test_metrics_need_prometheus_client_and_say_how_to_get_it() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import p11guard.metrics\n"
        "p11guard.metrics.health_wsgi  # the health apps need no prometheus_client\n"
        "try:\n"
        "    p11guard.metrics.register\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'p11guard[metrics]'" in done.stdout
