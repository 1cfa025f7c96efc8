"""Agents: the model side of an agent run (one model turn per call, see ``app.agents.llm``)."""
