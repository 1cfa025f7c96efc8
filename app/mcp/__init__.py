"""MCP (Model Context Protocol) client support: list a server's tools and call them from workers."""

from app.mcp.client import (
    GUARD_CODES,
    TRANSPORTS,
    HttpClientFactory,
    McpError,
    ToolInfo,
    ToolResult,
    call_tool,
    list_tools,
)

__all__ = [
    "GUARD_CODES",
    "TRANSPORTS",
    "HttpClientFactory",
    "McpError",
    "ToolInfo",
    "ToolResult",
    "call_tool",
    "list_tools",
]
