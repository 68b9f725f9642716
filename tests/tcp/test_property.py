"""Two engines over a seeded lossy channel deliver exact bytes both ways, half-close included."""

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.tcp import TcpSettings, TcpState

from .sim import run_transfer

VARIANTS = [dataclasses.replace(v, max_retries=30) for v in (
    TcpSettings(),
    TcpSettings(sack=False),
    TcpSettings(timestamps=False),
    TcpSettings(sack=False, timestamps=False, window_scaling=False, rcv_buffer=65535),
    TcpSettings(mss=536, rcv_buffer=8192, snd_buffer=4096, window_scaling=False),
    TcpSettings(mss=100, rcv_buffer=3000, snd_buffer=2000, window_scaling=False, max_ooo_bytes=500),
    TcpSettings(mss=1460, tso_size=20000, rcv_buffer=200000),
    TcpSettings(mss=9000, rcv_buffer=50000, sack=False),
)]

DONE = (TcpState.CLOSED, TcpState.TIME_WAIT)


def check(r, data_a, data_b):
    assert bytes(r.b.got) == data_a
    assert bytes(r.a.got) == data_b
    assert r.a.finished and r.b.finished
    assert not (r.a.timed_out or r.b.timed_out)
    assert r.a.conn.state in DONE and r.b.conn.state in DONE


@pytest.mark.parametrize("seed", range(300))
def test_lossy_transfer_many_seeds(seed):
    rng = random.Random(seed)
    data_a = rng.randbytes(rng.choice((0, 1, 1000, rng.randrange(0, 120000))))
    data_b = rng.randbytes(rng.choice((0, 5, rng.randrange(0, 40000))))
    r = run_transfer(seed, data_a, data_b,
                     settings_a=rng.choice(VARIANTS), settings_b=rng.choice(VARIANTS),
                     drop=rng.choice((0, 0.05, 0.15, 0.25)), dup=rng.choice((0, 0.1)),
                     reorder=rng.choice((0, 0.3, 0.8)), slow_reader=seed % 3 == 0)
    check(r, data_a, data_b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1),
       size_a=st.integers(0, 150000), size_b=st.integers(0, 60000),
       va=st.integers(0, len(VARIANTS) - 1), vb=st.integers(0, len(VARIANTS) - 1),
       drop=st.sampled_from([0.0, 0.02, 0.1, 0.2]), dup=st.sampled_from([0.0, 0.05, 0.2]),
       reorder=st.sampled_from([0.0, 0.2, 0.9]), latency=st.sampled_from([0.0005, 0.005, 0.2]),
       slow=st.booleans())
def test_lossy_transfer_property(seed, size_a, size_b, va, vb, drop, dup, reorder, latency, slow):
    rng = random.Random(seed)
    data_a = rng.randbytes(size_a)
    data_b = rng.randbytes(size_b)
    r = run_transfer(seed, data_a, data_b, settings_a=VARIANTS[va], settings_b=VARIANTS[vb],
                     drop=drop, dup=dup, reorder=reorder, latency=latency, slow_reader=slow)
    check(r, data_a, data_b)


def test_clean_channel_is_efficient():
    """No loss: no retransmissions, few ACKs."""
    data = random.Random(1).randbytes(500000)
    r = run_transfer(1, data, b"")
    check(r, data, b"")
    sa = r.a.conn.stats
    assert sa.retransmits == 0 and r.b.conn.stats.retransmits == 0
    assert r.b.conn.stats.segments_out < sa.segments_out
