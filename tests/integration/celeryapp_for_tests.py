"""A tiny Celery app for the supervisor's integration tests: workers are
started with ``-A celeryapp_for_tests`` (this directory on PYTHONPATH)."""

import os

from celery import Celery

app = Celery("celeryapp_for_tests", set_as_current=False)
# rpc:// sends each result back to the caller's own reply queue: no result
# store to set up, and the test's client reads it with AsyncResult.get().
app.conf.result_backend = "rpc://"


@app.task(name="scs_tests.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="scs_tests.hostname", bind=True)
def hostname(self) -> str:
    return self.request.hostname


@app.task(name="scs_tests.env_and_cwd")
def env_and_cwd() -> list:
    """What the worker was started with: an app's ``env`` and ``workdir``."""
    return [os.environ.get("SCS_TEST_VAR"), os.getcwd()]
