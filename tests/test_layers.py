"""The layout's promises, checked: imports flow one way and each process loads what it needs.

facade (p11guard/) -> supervisor -> actors -> host -> protocol -> base; the CLI and the
testing helpers sit beside the facade; the testbed knows nothing of its client; metrics
sees a guard only through the facade (its public methods) and uses base; the Dask job
(cluster) uses the facade and the CLI's formats.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_root

#: Which of our packages each layer may import (besides itself).
ALLOWED = {
    "base": set(),
    "protocol": {"base"},
    "host": {"protocol", "base"},
    "actors": {"host", "protocol", "base"},
    "supervisor": {"actors", "host", "protocol", "base"},
    "testbed": {"host", "protocol", "base"},
    "metrics": {"facade", "base"},
    # beside the CLI, above it: the Dask job uses the CLI's record, part and report formats;
    # the CLI reaches it only by a lazy import when `sign --dask` is asked for
    "cluster": {"facade", "cli", "base"},
}


def _our_imports(path: Path) -> set[str]:
    """``p11guard.<layer>`` names a module imports (``facade`` for the package itself)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "p11guard":
                out.add(parts[1] if len(parts) > 1 and not parts[1].startswith("_") else "facade")
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_flow_one_way(layer: str) -> None:
    bad = {}
    for path in sorted((repo_root() / layer).glob("*.py")):
        wrong = _our_imports(path) - ALLOWED[layer] - {layer}
        if wrong:
            bad[path.name] = sorted(wrong)
    assert bad == {}, f"{layer}/ imports layers above it: {bad}"


def _modules_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules: list[str] = json.loads(done.stdout)
    return modules


def test_a_host_loads_only_the_host() -> None:
    modules = _modules_after("import p11guard.host._main")
    heavy = {"pykka", "asyncio", "rich", "psutil", "multiprocessing", "cryptography", "logging"}
    assert sorted(m for m in modules if m.split(".")[0] in heavy) == []
    ours = {m for m in modules if m.startswith("p11guard")}
    assert (
        ours
        <= {"p11guard", "p11guard.host", "p11guard.protocol"}
        | {m for m in ours if m.startswith(("p11guard.host._", "p11guard.protocol._"))}
        and "p11guard.host._process" not in ours
    ), sorted(ours)


def test_a_host_hashes_without_openssl() -> None:
    # RSA PKCS#1 over raw CKM_RSA_PKCS, ECDSA, PSS with a pre-hash: CPython's own SHA-2.
    code = "import p11guard.host._main\nfrom p11guard.host._crypto import sha2\n"
    code += "assert sha2('sha384', b'abc').hex().startswith('cb00753f')\n[sha2(n, b'x') for n in ('sha256', 'sha512')]"
    modules = _modules_after(code)
    assert not [m for m in modules if m in ("hashlib", "_hashlib", "ssl", "_ssl")]


def test_the_base_imports_nothing_of_ours() -> None:
    modules = _modules_after("import p11guard.base")
    assert sorted(m for m in modules if m.startswith("p11guard") and not m.startswith("p11guard.base")) == ["p11guard"]


def test_the_testbed_imports_no_guard() -> None:
    modules = _modules_after("import p11guard.testbed")
    assert not [
        m for m in modules if m in ("p11guard._guard",) or m.startswith(("p11guard.supervisor", "p11guard.actors"))
    ]
    assert "pykka" not in modules


def test_import_p11guard_is_light() -> None:
    modules = _modules_after("import p11guard")
    heavy = ("pykka", "rich", "asyncio", "PyKCS11", "cryptography", "prometheus_client", "matplotlib")
    assert not [m for m in modules if m.split(".")[0] in heavy]
    # and the public names are all there, on first use
    names = _modules_after("import p11guard\nfor n in p11guard.__all__: getattr(p11guard, n)")
    assert "p11guard._guard" in names


def test_no_module_over_400_lines() -> None:
    root = repo_root()
    long = {
        str(p.relative_to(root)): n
        for folder in ("p11guard", *ALLOWED, "cli", "testing", "bench")
        for p in (root / folder).glob("*.py")
        if not p.is_symlink() and (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}


def test_import_p11guard_cluster_loads_no_dask() -> None:
    modules = _modules_after("import p11guard.cluster")
    assert not [m for m in modules if m.split(".")[0] in ("dask", "distributed", "pykka")]


def test_health_apps_load_no_prometheus_client() -> None:
    modules = _modules_after("import p11guard.metrics\np11guard.metrics.health_wsgi, p11guard.metrics.health_asgi")
    assert "p11guard.metrics._health" in modules
    assert not [m for m in modules if m.split(".")[0] in ("prometheus_client", "starlette", "matplotlib")]
