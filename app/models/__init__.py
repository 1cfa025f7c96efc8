"""ORM models. Importing this package registers every table on ``Base.metadata``."""

from app.models.audit import AuditEvent, AuditHead
from app.models.backfill import BackfillVerification
from app.models.connections import McpConnection, OAuthFlow
from app.models.identity import ApiToken, IdempotencyKey, Invitation, Membership, Org, Role, User, WebSession
from app.models.jobs import Job
from app.models.resources import Agent, AgentRun, AgentTool, McpServer, McpServerHeader, McpTool, Provider
from app.models.secrets import CacheInvalidation, Secret
from app.models.status import ConnectionStatus, FlowStatus, JobStatus, McpServerStatus

__all__ = [
    "Agent",
    "AgentRun",
    "AgentTool",
    "ApiToken",
    "AuditEvent",
    "AuditHead",
    "BackfillVerification",
    "CacheInvalidation",
    "ConnectionStatus",
    "FlowStatus",
    "IdempotencyKey",
    "Invitation",
    "Job",
    "JobStatus",
    "McpConnection",
    "McpServer",
    "McpServerHeader",
    "McpServerStatus",
    "McpTool",
    "Membership",
    "OAuthFlow",
    "Org",
    "Provider",
    "Role",
    "Secret",
    "User",
    "WebSession",
]
