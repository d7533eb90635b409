"""xgen: a declarative control plane for local LLM inference servers."""

__version__ = "0.1.0"
