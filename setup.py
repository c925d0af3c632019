from pathlib import Path

from setuptools import find_packages, setup

DATA_PACKAGES = ["scs.http.templates", "scs.migrations", "scs.migrations.versions"]

setup(
    name="scs-agent",
    version="0.1.0",
    description="Twisted daemon that owns and supervises the Celery workers of a machine",
    long_description=Path(__file__).with_name("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    # The directories without an __init__.py are named too (setuptools
    # warns about importable directories it was not told of); twisted.plugins
    # is a namespace portion: twistd finds scs_plugin.py there.
    packages=[*find_packages(include=["scs", "scs.*"]), *DATA_PACKAGES, "twisted.plugins"],
    # The checkout's root as the root of every package: an editable install
    # then puts the checkout on sys.path (a plain .pth line), where twistd's
    # plugin search looks for twisted/plugins/, without setuptools' "compat"
    # editable mode.
    package_dir={"": "."},
    package_data={"scs.http.templates": ["*"], "scs.migrations": ["script.py.mako"]},
    install_requires=[
        "Twisted[conch]>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "txAMQP>=0.8.2",
        "celery>=5.5.0",
        "SQLAlchemy>=2.0.30",
        "alembic>=1.13.0",
        "attrs>=23.2.0",
        "prometheus_client>=0.20.0",
        # the `scs` command line (scs.cli) and its library (scs.client)
        "click>=8.1",
        "httpx>=0.27",
        "rich>=13.7",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "supervisor>=4.2.5",
            "playwright>=1.44",
            "wheel>=0.43",  # the normal-install test builds a wheel offline
            "ruff>=0.6",  # linter and formatter, run by make test
            "flower>=2.0",  # a task monitor, to check app task_events end to end
            "openapi-spec-validator>=0.7",  # GET /openapi.json is a valid OpenAPI 3.1 document
            "schemathesis>=4.0",  # generated requests against a live agent, checked against the document
        ],
    },
    entry_points={"console_scripts": ["scs-agent = scs.tap:main", "scs = scs.cli:main"]},
    zip_safe=False,
)
