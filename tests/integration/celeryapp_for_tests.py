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


@app.task(name="scs_tests.slow_mark", bind=True)
def slow_mark(self, directory: str, seconds: float = 0.5) -> str:
    """Sleep ``seconds`` (a slow task for the autoscaling tests), then add
    one line to ``<directory>/<task id>``: a task run twice leaves two."""
    import time

    time.sleep(seconds)
    with open(os.path.join(directory, str(self.request.id)), "a", encoding="utf-8") as f:
        f.write(f"{self.request.hostname}\n")
    return self.request.id
