"""Entry points: the faramesh CLI, .faramesh/bin/agent, __agent-exec."""
