"""The agentic policy: Profiling, Analysis (LLM or offline) and Master agents."""
