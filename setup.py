from setuptools import find_packages, setup

setup(
    name="scs-agent",
    version="0.1.0",
    description="Twisted daemon that owns and supervises the Celery workers of a machine",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    packages=find_packages(include=["scs", "scs.*"]) + ["twisted.plugins"],
    package_data={
        "scs": [
            "migrations/*.py",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
            "http/templates/*",
        ]
    },
    include_package_data=True,
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
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "supervisor>=4.2.5",
            "playwright>=1.44",
            "wheel>=0.43",  # the normal-install test builds a wheel offline
            "ruff>=0.6",  # linter and formatter, run by make test
        ],
    },
    entry_points={"console_scripts": ["scs-agent = scs.tap:main"]},
    zip_safe=False,
)
