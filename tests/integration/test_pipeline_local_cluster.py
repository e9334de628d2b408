"""The local cluster the pipeline starts when given no address: private, job-ready, gone afterwards."""

from __future__ import annotations

import time

import pytest

from alpaca_ray.pipeline.runner import http_answers, local_cluster, submit_job

pytestmark = pytest.mark.ray


def test_jobs_on_the_local_cluster_run_on_it_and_it_stops_with_the_pipeline():
    from ray.job_submission import JobStatus, JobSubmissionClient

    with local_cluster(num_cpus=3) as (url, headers):
        with pytest.raises(Exception, match="(?i)auth"):  # its own token guards it
            JobSubmissionClient(url).list_jobs()
        client = JobSubmissionClient(url, headers=headers)
        # The driver must join *this* cluster (3 logical CPUs), not whichever one on the machine started last.
        job = submit_job(client, entrypoint="python -c \"import ray; ray.init(); "
                                           "print('cpus', ray.cluster_resources()['CPU'])\"")
        deadline = time.monotonic() + 120
        while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-2000:]
        assert "cpus 3.0" in client.get_job_logs(job)
    assert not http_answers(f"{url}/api/version", timeout=2)
