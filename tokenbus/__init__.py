"""tokenbus: LLM token streaming over Kafka.

This package holds what the parts share (settings, the Kafka client factory, the
embedded broker, the command line). The parts themselves are `schemas`,
`producers`, `workers`, `relay` and `consumers`.
"""

__version__ = "0.1.0"
