"""twistd plugin for the SCS agent: ``twistd -n scs-agent``.

Kept lazy so that ``twistd --help`` does not import the agent.
"""

from twisted.application.service import ServiceMaker

scsAgent = ServiceMaker(
    "SCS agent",
    "scs.tap",
    "Owns and supervises the Celery workers of this machine.",
    "scs-agent",
)
