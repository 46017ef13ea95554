"""Ratios, goals, the table, the chart and the BENCHMARKS.md section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["add_ratios", "goals", "table", "write_report"]


def add_ratios(results: list[dict[str, Any]]) -> None:
    for row in results:
        same = [r for r in results if r["setup"] == row["setup"] and r["mech"] == row["mech"]]
        one = next((r["ops_per_s"] for r in same if r["name"] == "PyKCS11 1 thread"), None)
        best = max((r["ops_per_s"] or 0 for r in same if r["name"].startswith("PyKCS11")), default=0)
        row["x_pykcs11_1t"] = round(row["ops_per_s"] / one, 2) if row["ops_per_s"] and one else None
        row["x_best_pykcs11"] = round(row["ops_per_s"] / best, 2) if row["ops_per_s"] and best else None


def _find(results: list[dict[str, Any]], setup: str, mech: str, name: str) -> dict[str, Any]:
    return next((r for r in results if (r["setup"], r["mech"], r["name"]) == (setup, mech, name)), {})


Goal = tuple[str, bool | None, str]


def _explain(out: list[Goal], row: dict[str, Any], cores: int, want: float, ratio: str) -> None:
    """Append to the last goal's figure where its CPU went, against its budget: all the
    cores' time at the goal's rate (``want`` times the rate ``ratio`` compares with)."""
    split = row.get("cpu_us_per_op")
    if not split or not row.get(ratio) or not row.get("ops_per_s"):
        return
    goal_per_s = want * row["ops_per_s"] / row[ratio]
    goal, met, figure = out[-1]
    used = ", ".join(f"{k} {v}" for k, v in split.items() if k != "idle_pct" and v)
    budget = round(cores * 1e6 / goal_per_s)
    out[-1] = (goal, met, f"{figure}; CPU us/op: {used}, idle {split.get('idle_pct')}% (budget at the goal: {budget})")


def goals(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """Each goal of the benchmark issue: (goal, met?, the figures)."""
    r = data["results"]
    out: list[tuple[str, bool | None, str]] = []

    def ratio(setup: str, mech: str, name: str, key: str = "x_pykcs11_1t") -> float | None:
        value = _find(r, setup, mech, name).get(key)
        return float(value) if value is not None else None

    def add(goal: str, value: float | None, want: float, unit: str = "x") -> None:
        out.append(
            (
                goal,
                None if value is None else value >= want,
                f"{value}{unit}" if value is not None else "not measured",
            )
        )

    add(
        "CPU-bound RSA-2048: p11guard 2 workers >= 1.6x PyKCS11 1 thread",
        max(
            filter(
                None,
                [ratio("cpu", "rsa", "p11guard sign x8 threads, 2w"), ratio("cpu", "rsa", "p11guard sign_many, 2w")],
            ),
            default=None,
        ),
        1.6,
    )
    add(
        "CPU-bound ECDSA P-256: sign_many 2 workers >= 1.5x PyKCS11 1 thread",
        ratio("cpu", "ecdsa", "p11guard sign_many, 2w"),
        1.5,
    )
    cores = data.get("settings", {}).get("cpus") or 1
    for name in ("p11guard asign x256, 2w", "p11guard sign x16 threads, 2w"):
        add(f"Service, CPU-bound ECDSA: {name} >= 1.5x PyKCS11 1 thread", ratio("cpu", "ecdsa", name), 1.5)
        _explain(out, _find(r, "cpu", "ecdsa", name), cores, 1.5, "x_pykcs11_1t")
    many = _find(r, "net", "ecdsa", "p11guard sign_many, 16w").get("ops_per_s")
    for name in ("p11guard asign x256, 16w", "p11guard sign x16 threads, 16w"):
        single = _find(r, "net", "ecdsa", name).get("ops_per_s")
        add(
            f"Service, latency-bound ECDSA: {name} >= 0.8x sign_many 16w",
            round(single / many, 2) if single and many else None,
            0.8,
        )
        add(
            f"Service, latency-bound ECDSA: {name} >= 18x best PyKCS11",
            ratio("net", "ecdsa", name, "x_best_pykcs11"),
            18,
        )
        _explain(out, _find(r, "net", "ecdsa", name), cores, 18, "x_best_pykcs11")
    add(
        "Latency-bound ECDSA: p11guard 16 workers >= 10x best PyKCS11",
        max(
            filter(
                None,
                [
                    ratio("net", "ecdsa", "p11guard sign x8 threads, 16w", "x_best_pykcs11"),
                    ratio("net", "ecdsa", "p11guard sign_many, 16w", "x_best_pykcs11"),
                ],
            ),
            default=None,
        ),
        10,
    )
    pk8 = _find(r, "net", "ecdsa", "python-pkcs11 8 threads").get("ops_per_s")
    g16 = max(
        filter(
            None,
            [
                _find(r, "net", "ecdsa", "p11guard sign x8 threads, 16w").get("ops_per_s"),
                _find(r, "net", "ecdsa", "p11guard sign_many, 16w").get("ops_per_s"),
            ],
        ),
        default=None,
    )
    add(
        "Latency-bound ECDSA: p11guard 16 workers >= python-pkcs11 8 threads",
        round(g16 / pk8, 2) if g16 and pk8 else None,
        1.0,
    )
    add(
        "One host, batch frames of 64 ECDSA >= 0.9x direct PyKCS11",
        ratio("cpu", "ecdsa", "one host, batch 64"),
        0.9,
    )
    lat = data["latency"]
    figure = f"{lat['overhead_p50_us']} us"
    if "bare_host_overhead_p50_us" in lat:
        own = round(lat["overhead_p50_us"] - lat["bare_host_overhead_p50_us"], 1)
        bare = lat["bare_host_overhead_p50_us"]
        figure += f" (a bare host, one op a frame: {bare} us; p11guard's own part: {own} us)"
    out.append(("Single-op overhead p50 <= 150 us", lat["overhead_p50_us"] <= 150, figure))
    rec = data["recovery"]
    out.append(
        (
            "restore -> first success <= backoff_max_s + 0.5 s",
            rec["restore_to_first_op_s"] <= rec["backoff_max_s"] + 0.5,
            f"{rec['restore_to_first_op_s']} s",
        )
    )
    out.append(
        (
            "first failing call -> LOST <= 0.2 s (measured from `lose`)",
            rec["lose_to_lost_s"] <= 0.2,
            f"{rec['lose_to_lost_s']} s",
        )
    )
    out.append(
        (
            "hang -> recovery started <= call_s + probe_s + 1 s",
            rec["hang_to_recovering_s"] <= rec["hang_goal_s"],
            f"{rec['hang_to_recovering_s']} s (goal {rec['hang_goal_s']} s)",
        )
    )
    mem = data.get("members")
    if mem:
        out.append(
            (
                "one member of 3 lost: >= 60% of the healthy rate and no failed op",
                mem["one_lost_ratio"] is not None and mem["one_lost_ratio"] >= 0.6 and mem["failed_ops"] == 0,
                f"{mem['one_lost_ratio']}x ({mem['one_lost_ops_per_s']} of {mem['healthy_ops_per_s']} ops/s), "
                f"{mem['failed_ops']} failed",
            )
        )
        out.append(
            (
                "member restore -> its first op <= backoff_max_s + 0.5 s",
                mem["member_restore_to_first_op_s"] <= mem["backoff_max_s"] + 0.5,
                f"{mem['member_restore_to_first_op_s']} s",
            )
        )
    hosts = [row["rss_host_max_mib"] for row in r if "rss_host_max_mib" in row]
    out.append(
        (
            "host RSS under load <= 20 MiB",
            max(hosts) <= 20 if hosts else None,
            f"{max(hosts) if hosts else '?'} MiB max",
        )
    )
    for setup, h in (data.get("hosts") or {}).items():
        out.append(
            (
                f"host ready (spawn -> hello, module loaded), {setup}: p50 <= 100 ms",
                h["ready_ms_p50"] <= 100,
                f"{h['ready_ms_p50']} ms p50, {h['ready_ms_max']} ms max",
            )
        )
        out.append(
            (
                f"host RSS after open + 200 signatures, {setup}: <= 20 MiB",
                h["rss_mib_max"] <= 20,
                f"{h['rss_mib_p50']} MiB p50, {h['rss_mib_max']} MiB max",
            )
        )
    return out


def table(data: dict[str, Any]) -> str:
    lines = [f"{'setup':<5} {'mech':<6} {'contender':<34} {'ops/s':>10} {'x PyKCS11 1t':>13} {'x best PyKCS11':>15}"]
    for r in data["results"]:
        lines.append(
            f"{r['setup']:<5} {r['mech']:<6} {r['name']:<34} {r['ops_per_s']!s:>10} "
            f"{r['x_pykcs11_1t']!s:>13} {r['x_best_pykcs11']!s:>15}"
        )
    lines.append("")
    lines.append(
        f"proxy: latency {data['proxy']['set_ms']} ms set, {data['proxy']['added_one_way_ms']} ms really added one way"
    )
    lines.append("single op (ECDSA, CPU-bound, 1 thread): " + ", ".join(f"{k} {v}" for k, v in data["latency"].items()))
    lines.append("recovery: " + ", ".join(f"{k} {v}" for k, v in data["recovery"].items()))
    if data.get("hosts"):
        lines.append("hosts: " + ", ".join(f"{k} {v}" for k, v in data["hosts"].items()))
    if data.get("members"):
        lines.append("members: " + ", ".join(f"{k} {v}" for k, v in data["members"].items()))
    lines.append("")
    for goal, met, figure in goals(data):
        lines.append(f"[{'MET' if met else 'NOT MET' if met is False else '?'}] {goal}: {figure}")
    return "\n".join(lines)


def _chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cpu", "ecdsa"), ("cpu", "rsa"), ("net", "ecdsa"), ("net", "rsa")]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for ax, (setup, mech) in zip(axes.flat, panels, strict=True):
        rows = [r for r in data["results"] if r["setup"] == setup and r["mech"] == mech]
        names = [r["name"] for r in rows]
        values = [r["ops_per_s"] or 0 for r in rows]
        colors = ["#888888" if not r["name"].startswith(("p11guard", "one host")) else "#1f77b4" for r in rows]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        where = "SoftHSM2 direct (CPU-bound)" if setup == "cpu" else "testbed, 1 ms one way (network)"
        ax.set_title(f"{'ECDSA P-256' if mech == 'ecdsa' else 'RSA-2048'} - {where}")
        ax.set_xlabel("signatures/s")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_report(data: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _chart(data, directory / "bench.png")
    (directory / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    md = [
        "## Measured (scripts/bench)",
        "",
        f"{data['settings']['cpus']} cores; {data['settings']['runs']} runs of {data['settings']['seconds']} s per "
        "figure (median), after a warm-up; each case in a fresh process.",
        "",
        "![ops/s by contender and setup](bench-report/bench.png)",
        "",
        "| setup | mech | contender | ops/s | x PyKCS11 1 thread | x best PyKCS11 |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in data["results"]:
        md.append(
            f"| {r['setup']} | {r['mech']} | {r['name']} | {r['ops_per_s']} | {r['x_pykcs11_1t']} | "
            f"{r['x_best_pykcs11']} |"
        )
    md += ["", "| goal | met | figure |", "|---|---|---|"]
    for goal, met, figure in goals(data):
        md.append(f"| {goal} | {'yes' if met else 'no' if met is False else '?'} | {figure} |")
    p = data["proxy"]
    md += [
        "",
        f"Proxy delay: `latency {p['set_ms']}` really adds {p['added_one_way_ms']} ms one way "
        f"(round trip {p['rtt0_ms']} ms -> {p['rtt_ms']} ms).",
        "",
        "Single op: " + ", ".join(f"{k} {v}" for k, v in data["latency"].items()),
        "",
        "Floors of this machine (bench/_floors.py): "
        + ", ".join(f"{k} {v}" for k, v in data.get("floors", {}).items()),
        "",
        "Recovery: " + ", ".join(f"{k} {v}" for k, v in data["recovery"].items()),
        "",
    ]
    if data.get("hosts"):
        md += ["Hosts: " + ", ".join(f"{k} {v}" for k, v in data["hosts"].items()), ""]
    if data.get("members"):
        md += ["Members (3, one lost): " + ", ".join(f"{k} {v}" for k, v in data["members"].items()), ""]
    section = directory / "BENCHMARKS-section.md"
    section.write_text("\n".join(md))
    return section
