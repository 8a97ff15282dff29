"""Autoscaling of the shipped SmolLM2 cluster between 1 and 2 replicas on a load ramp, with no failed request.

Thresholds (the YAML keys, here as flags): target_ongoing_requests 1 - four requests kept in flight ask for four
replicas, capped at max_replicas 2, after upscale_delay_s 1; with the load gone, zero in flight asks for
min_replicas 1 after downscale_delay_s 6; look_back_period_s 2 averages the load over 2 s.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_helpers import SMOLLM2_CLUSTER, ClusterServer

pytestmark = [pytest.mark.multi_rank, pytest.mark.slow]

SCALING = ["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1", "--upscale-delay-s", "1",
           "--downscale-delay-s", "6", "--look-back-period-s", "2"]
IN_FLIGHT = 4


def test_replicas_scale_1_to_2_under_load_and_back_to_1_without_a_failed_request():
    server = ClusterServer(["--config", str(SMOLLM2_CLUSTER), *SCALING])
    try:
        base = server.client.models.list().data[0].id
        assert len(server.wait_for(lambda rs: len(rs) >= 1, 30, "the first replica")) == 1
        stop, answers, failures = threading.Event(), [], []

        def keep_busy() -> None:
            while not stop.is_set():
                try:
                    out = server.client.completions.create(model=base, prompt="Count to ten:", max_tokens=24,
                                                           temperature=0.0, extra_body={"ignore_eos": True})
                    answers.append(out.choices[0].text)
                except Exception as err:  # a failed request is the test's failure, reported below
                    failures.append(repr(err))

        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            for _ in range(IN_FLIGHT):
                pool.submit(keep_busy)
            try:
                server.wait_for(lambda rs: len(rs) == 2 and all(r["healthy"] for r in rs), 150,
                                "scaling up to 2 replicas")
            finally:
                stop.set()
        server.wait_for(lambda rs: len(rs) == 1, 120, "scaling back to 1 replica")
        assert not failures, failures[:3]
        assert answers and len(set(answers)) == 1, "greedy answers differ between replicas"
        last = server.client.completions.create(model=base, prompt="Count to ten:", max_tokens=24, temperature=0.0,
                                                extra_body={"ignore_eos": True})
        assert last.choices[0].text == answers[0]
    finally:
        assert server.stop() == 0, server.log()
