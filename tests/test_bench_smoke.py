"""The benchmark harness's smoke mode runs end to end, so the harness cannot rot.

``python -m benchmarks --smoke`` sets up every stack under test (netkit, netkit --offload,
pasta, slirp4netns, a kernel veth) at both MTUs and takes every figure once, briefly
(about a minute). The JSON must name every stack and hold every figure for each: a
number, or an explicit "unsupported" / "n/a" marker with a reason. A stack that failed
(did not start, died, errored) fails the test with the harness's reason.
"""

import json
import os
import subprocess
import sys

import pytest

from netkit.testing import require_privileged, require_tool

pytestmark = pytest.mark.privileged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _harness():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import harness, stacks
    return harness, stacks


def test_bench_smoke_reports_every_stack_and_figure(tmp_path):
    require_privileged()
    for name in ("iperf3", "pasta", "slirp4netns", "busybox", "unshare"):
        require_tool(name)
    harness, stacks = _harness()
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())

    expected_stacks = [s.key for s in stacks.default_specs()]
    expected_figures = harness.figure_keys(smoke=True)
    assert doc["mode"] == "smoke"
    assert doc["stacks"] == expected_stacks
    assert list(doc["figures"]) == expected_figures
    problems: dict[str, list[str]] = {}  # reason -> "stack figure"s
    for stack in expected_stacks:
        per_stack = doc["results"].get(stack, {})
        for fig in expected_figures:
            e = per_stack.get(fig)
            if e is None:
                problems.setdefault("missing from the JSON", []).append(f"{stack} {fig}")
            elif e["status"] == "ok":
                assert isinstance(e["median"], (int, float)), (stack, fig, e)
                assert e["median"] >= 0, (stack, fig, e)
            elif e["status"] in ("unsupported", "n/a", "limit"):
                assert e["reason"], (stack, fig, e)
            else:
                problems.setdefault(f"{e['status']}: {e.get('reason')}", []).append(f"{stack} {fig}")
    # the kernel is the upper limit: it must measure everything it can
    for mtu in (1500, 65520):
        for fig in ("tcp_up_gbps", "tcp_down_gbps", "conn_seq_per_s", "rr_median_us", "udp_gbps", "dns_qps"):
            assert doc["results"][f"veth/{mtu}"][fig]["status"] == "ok", doc["results"][f"veth/{mtu}"][fig]
    assert not problems, "stacks failed in the benchmark smoke run:\n" + "\n".join(
        f"{', '.join(where)}: {reason}" for reason, where in problems.items())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert doc["ratios"], "no netkit/pasta or netkit/slirp4netns ratios"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "smoke.png").stat().st_size > 0
